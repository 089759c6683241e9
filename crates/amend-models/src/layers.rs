//! Building blocks shared by the adapters: input checks, attention masks, rotary embeddings,
//! scaled dot-product attention with grouped-query heads, norms and the KV cache.

use tch::{Device, Kind, Tensor};

use crate::config::{Activation, ModelConfig, RopeScaling};
use crate::{Error, Result};

/// Per-layer key/value cache for incremental decoding.
///
/// Buffers are preallocated for `capacity` positions (`[b_sz, kv_heads, capacity, head_dim]` per
/// layer); each forward call writes its new keys and values after the `len` cached ones and
/// attends over the first `len + new` positions. Create one with
/// [`CausalLm::new_kv_cache`](crate::CausalLm::new_kv_cache).
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
    batch: usize,
}

impl KvCache {
    /// An empty cache for `batch` rows and up to `capacity` positions.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a zero batch or capacity; [`Error::Tch`].
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        capacity: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if batch == 0 || capacity == 0 {
            return Err(Error::invalid("KvCache::new", "batch/capacity", "must be positive"));
        }
        let shape =
            [batch as i64, cfg.num_kv_heads() as i64, capacity as i64, cfg.head_dim() as i64];
        let mut keys = Vec::with_capacity(cfg.num_layers());
        let mut values = Vec::with_capacity(cfg.num_layers());
        for _ in 0..cfg.num_layers() {
            keys.push(Tensor::f_zeros(shape, (kind, device))?);
            values.push(Tensor::f_zeros(shape, (kind, device))?);
        }
        Ok(KvCache { keys, values, len: 0, capacity, batch })
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Forgets the cached positions (the buffers are reused).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Writes `k`, `v` (`[b, kv_heads, t, d]`) of `layer` after the cached positions and returns
    /// views of all `len + t` keys and values.
    pub(crate) fn update(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.size()[2];
        let len = self.len as i64;
        let mut kd = self.keys[layer].f_narrow(2, len, t)?;
        kd.f_copy_(k)?;
        let mut vd = self.values[layer].f_narrow(2, len, t)?;
        vd.f_copy_(v)?;
        Ok((self.keys[layer].f_narrow(2, 0, len + t)?, self.values[layer].f_narrow(2, 0, len + t)?))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    pub(crate) fn check(
        &self,
        op: &'static str,
        cfg: &ModelConfig,
        b: usize,
        t: usize,
    ) -> Result<()> {
        if self.keys.len() != cfg.num_layers() {
            return Err(Error::invalid(op, "cache", "built for a different model"));
        }
        if self.batch != b {
            return Err(Error::invalid(
                op,
                "cache",
                format!("cache has {} rows, input has {b}", self.batch),
            ));
        }
        if self.len + t > self.capacity {
            return Err(Error::invalid(
                op,
                "cache",
                format!(
                    "{} cached + {t} new positions exceed the capacity {}",
                    self.len, self.capacity
                ),
            ));
        }
        Ok(())
    }
}

/// How attention is restricted, computed once per forward call.
#[derive(Debug)]
pub(crate) enum MaskSpec {
    /// Plain causal attention over `t` positions (no cache, no padding): `is_causal`.
    Causal,
    /// Every query sees every key (one new token, nothing to hide).
    All,
    /// Explicit boolean mask `[b or 1, 1, t_q, t_k]`, `true` = attend.
    Explicit(Tensor),
}

/// Validated inputs of one forward call.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub input_ids: Tensor,
    /// Positions for embeddings / RoPE: `[b, t]`, or `[1, t]` when no row is padded.
    pub positions: Tensor,
    /// Key padding (`[b, past + t]` bool, `true` = token) when some position is padding.
    pub key_mask: Option<Tensor>,
    pub t: usize,
    pub past: usize,
}

/// Checks `input_ids` / `attention_mask` against the model and cache, derives positions.
///
/// Positions are `cumsum(mask) − 1` (clamped at 0): a left-padded row gets the positions it
/// would have without padding, as Hugging Face `generate` computes them.
pub(crate) fn prepare(
    op: &'static str,
    cfg: &ModelConfig,
    device: Device,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    cache: Option<&KvCache>,
) -> Result<Prepared> {
    let size = input_ids.size();
    if size.len() != 2 || size[0] == 0 || size[1] == 0 {
        return Err(Error::invalid(
            op,
            "input_ids",
            format!("expected [b_sz, seq_len] with both > 0, got {size:?}"),
        ));
    }
    let (b, t) = (size[0] as usize, size[1] as usize);
    let ids = match input_ids.f_kind()? {
        Kind::Int64 => input_ids.shallow_clone(),
        Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 => input_ids.f_to_kind(Kind::Int64)?,
        k => {
            return Err(Error::invalid(
                op,
                "input_ids",
                format!("expected integer ids, got {k:?}"),
            ));
        }
    };
    let ids = if ids.device() != device { ids.f_to_device(device)? } else { ids };
    let (lo, hi) = (ids.f_min()?.f_int64_value(&[])?, ids.f_max()?.f_int64_value(&[])?);
    let vocab = cfg.vocab_size() as i64;
    if lo < 0 || hi >= vocab {
        let bad = if lo < 0 { lo } else { hi };
        return Err(Error::invalid(
            op,
            "input_ids",
            format!("token id {bad} outside the vocabulary [0, {vocab})"),
        ));
    }
    let past = match cache {
        Some(c) => {
            c.check(op, cfg, b, t)?;
            c.len()
        }
        None => 0,
    };
    if let Some(max) = cfg.max_positions()
        && past + t > max
    {
        return Err(Error::invalid(
            op,
            "input_ids",
            format!("{} positions exceed the model's {max} position embeddings", past + t),
        ));
    }
    let total = past + t;
    let key_mask = match attention_mask {
        None => None,
        Some(m) => {
            if m.size() != [b as i64, total as i64] {
                return Err(Error::ShapeMismatch {
                    op,
                    expected: vec![b as i64, total as i64],
                    got: m.size(),
                });
            }
            let m = if m.device() != device { m.f_to_device(device)? } else { m.shallow_clone() };
            let m = m.f_ne(0)?;
            if m.f_all()?.f_int64_value(&[])? != 0 { None } else { Some(m) }
        }
    };
    let positions = match &key_mask {
        // `[1, t]`: broadcast over the batch (cheaper embedding backward than `[b, t]`).
        None => Tensor::f_arange_start(past as i64, total as i64, (Kind::Int64, device))?
            .f_unsqueeze(0)?,
        Some(m) => m
            .f_to_kind(Kind::Int64)?
            .f_cumsum(1, Kind::Int64)?
            .f_sub_scalar(1)?
            .f_clamp_min(0)?
            .f_narrow(1, past as i64, t as i64)?,
    };
    Ok(Prepared { input_ids: ids, positions, key_mask, t, past })
}

/// The attention mask for `t` new queries after `past` cached keys.
///
/// Query `i` (absolute index `past + i`) attends to key `j` iff `j ≤ past + i`, key `j` is not
/// padding, and (with a window `w`) `past + i − j < w`. Every query also attends to itself, so a
/// padding query (whose keys are all padding) gets finite, ignorable outputs instead of NaN.
pub(crate) fn build_mask(p: &Prepared, window: Option<usize>, device: Device) -> Result<MaskSpec> {
    let total = p.past + p.t;
    let window_binds = window.is_some_and(|w| total > w);
    if p.key_mask.is_none() && !window_binds {
        if p.past == 0 {
            return Ok(MaskSpec::Causal);
        }
        if p.t == 1 {
            return Ok(MaskSpec::All);
        }
    }
    let q = Tensor::f_arange_start(p.past as i64, total as i64, (Kind::Int64, device))?
        .f_unsqueeze(1)?;
    let k = Tensor::f_arange(total as i64, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let mut allowed = k.f_le_tensor(&q)?;
    if let Some(w) = window {
        allowed = allowed.f_logical_and(&q.f_sub(&k)?.f_lt(w as i64)?)?;
    }
    let mut mask = allowed.f_unsqueeze(0)?.f_unsqueeze(0)?; // [1, 1, t, total]
    if let Some(km) = &p.key_mask {
        let km = km.f_unsqueeze(1)?.f_unsqueeze(1)?; // [b, 1, 1, total]
        let diag = k.f_eq_tensor(&q)?.f_unsqueeze(0)?.f_unsqueeze(0)?;
        mask = mask.f_logical_and(&km)?.f_logical_or(&diag)?;
    }
    Ok(MaskSpec::Explicit(mask))
}

/// Scaled dot-product attention of `q` `[b, h, t_q, d]` over `k`, `v` `[b, h_kv, t_k, d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskSpec,
    scale: f64,
    dropout: f64,
    upcast: bool,
) -> Result<Tensor> {
    let h = q.size()[1];
    let h_kv = k.size()[1];
    let (k, v) = if h != h_kv {
        (repeat_kv(k, h / h_kv)?, repeat_kv(v, h / h_kv)?)
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    let kind = q.f_kind()?;
    let (q, k, v) = if upcast && kind != Kind::Float && kind != Kind::Double {
        (q.f_to_kind(Kind::Float)?, k.f_to_kind(Kind::Float)?, v.f_to_kind(Kind::Float)?)
    } else {
        (q.shallow_clone(), k, v)
    };
    let out = match mask {
        MaskSpec::Causal => Tensor::f_scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, dropout, true, scale, false,
        )?,
        MaskSpec::All => Tensor::f_scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, dropout, false, scale, false,
        )?,
        MaskSpec::Explicit(m) => Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(m),
            dropout,
            false,
            scale,
            false,
        )?,
    };
    Ok(if out.f_kind()? != kind { out.f_to_kind(kind)? } else { out })
}

/// `[b, h_kv, t, d]` → `[b, h_kv·n_rep, t, d]` (each kv head repeated for its query group).
fn repeat_kv(x: &Tensor, n_rep: i64) -> Result<Tensor> {
    let s = x.size();
    Ok(x.f_unsqueeze(2)?.f_expand([s[0], s[1], n_rep, s[2], s[3]], false)?.f_reshape([
        s[0],
        s[1] * n_rep,
        s[2],
        s[3],
    ])?)
}

/// Rotary position embedding of one model.
#[derive(Debug)]
pub(crate) struct Rope {
    /// `[head_dim / 2]` inverse frequencies (f32, CPU), computed as transformers does.
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling) -> Result<Self> {
        let dim = head_dim as i64;
        let exponents = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim)?;
        let inv_freq = Tensor::f_pow_scalar(theta, &exponents)?.f_reciprocal()?;
        let inv_freq = match scaling {
            RopeScaling::Default => inv_freq,
            RopeScaling::Linear { factor } => inv_freq.f_div_scalar(factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * std::f64::consts::PI)?;
                let scaled = inv_freq.f_div_scalar(factor)?;
                let llama = scaled.f_where_self(&wavelen.f_gt(low_wavelen)?, &inv_freq)?;
                let smooth = wavelen
                    .f_reciprocal()?
                    .f_mul_scalar(old)?
                    .f_sub_scalar(low_freq_factor)?
                    .f_div_scalar(high_freq_factor - low_freq_factor)?;
                let one_minus = smooth.f_neg()?.f_add_scalar(1.0)?;
                let smoothed =
                    one_minus.f_mul(&llama)?.f_div_scalar(factor)?.f_add(&smooth.f_mul(&llama)?)?;
                let medium = wavelen
                    .f_lt(high_wavelen)?
                    .f_logical_not()?
                    .f_logical_and(&wavelen.f_gt(low_wavelen)?.f_logical_not()?)?;
                smoothed.f_where_self(&medium, &llama)?
            }
        };
        Ok(Rope { inv_freq })
    }

    /// `cos`, `sin` of shape `[b, 1, t, head_dim]` in `kind` for `positions` `[b, t]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let device = positions.device();
        let inv = self.inv_freq.f_to_device(device)?;
        let freqs = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&inv)?; // [b, t, d/2]
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }
}

/// `x·cos + rotate_half(x)·sin` with `rotate_half([x1, x2]) = [−x2, x1]`.
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.size()[3];
    let x1 = x.f_narrow(3, 0, d / 2)?;
    let x2 = x.f_narrow(3, d / 2, d / 2)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}

/// RMSNorm as transformers computes it: in f32, cast back before the weight.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let kind = x.f_kind()?;
    if matches!(kind, Kind::Float | Kind::Double) {
        return Ok(x.f_rms_norm([*x.size().last().unwrap_or(&1)], Some(weight), eps)?);
    }
    let xf = x.f_to_kind(Kind::Float)?;
    let var = xf.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
    let normed = xf.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?.f_to_kind(kind)?;
    Ok(normed.f_mul(weight)?)
}

/// LayerNorm over the last dimension.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let h = *x.size().last().unwrap_or(&1);
    Ok(x.f_layer_norm([h], Some(weight), Some(bias), eps, true)?)
}

/// The activation function (see [`Activation`] for the precision policy of the tanh GELUs).
pub(crate) fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    let low_precision = !matches!(x.f_kind()?, Kind::Float | Kind::Double);
    Ok(match act {
        Activation::GeluNew if low_precision => {
            // transformers' NewGELUActivation, op by op.
            let inner = x.f_add(&x.f_pow_tensor_scalar(3.0)?.f_mul_scalar(0.044715)?)?;
            let t = inner.f_mul_scalar((2.0 / std::f64::consts::PI).sqrt())?.f_tanh()?;
            x.f_mul_scalar(0.5)?.f_mul(&t.f_add_scalar(1.0)?)?
        }
        Activation::GeluFast if low_precision => {
            // transformers' FastGELUActivation, op by op.
            let inner = x
                .f_mul_scalar(0.7978845608)?
                .f_mul(&x.f_mul(x)?.f_mul_scalar(0.044715)?.f_add_scalar(1.0)?)?;
            x.f_mul_scalar(0.5)?.f_mul(&inner.f_tanh()?.f_add_scalar(1.0)?)?
        }
        Activation::GeluNew | Activation::GeluFast | Activation::GeluPytorchTanh => {
            x.f_gelu("tanh")?
        }
        Activation::Gelu => x.f_gelu("none")?,
        Activation::Relu => x.f_relu()?,
        Activation::Silu => x.f_silu()?,
    })
}

/// Dropout in train mode (identity in eval mode or for `p = 0`).
pub(crate) fn dropout(x: Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 { Ok(x.f_dropout(p, true)?) } else { Ok(x) }
}
