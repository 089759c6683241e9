//! Installation check: prints the libtorch runtime and computes a small loss with autograd.
//!
//! ```text
//! cargo run --release --example smoke
//! ```

use anyhow::{Result, ensure};
use tch::{Kind, Tensor};

fn main() -> Result<()> {
    let info = amend::runtime::RuntimeInfo::detect();
    println!("{info}");

    // KL(q ‖ softmax(z)) for 3 tokens over a 4-word vocabulary, with its gradient by autograd.
    let z = Tensor::from_slice(&[2.0f32, 1.0, 0.5, -1.0, 0.0, 0.0, 0.0, 0.0, 3.0, -2.0, 1.0, 0.5])
        .reshape([3, 4])
        .set_requires_grad(true);
    let q = Tensor::from_slice(&[1.5f32, 1.2, 0.3, -0.5, 0.0, 1.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4])
        .reshape([3, 4])
        .softmax(-1, Kind::Float);
    let logp = z.log_softmax(-1, Kind::Float);
    let kl = (&q * (q.log() - &logp)).sum(Kind::Float);
    kl.backward();
    let grad = z.grad();
    // The gradient of KL(q ‖ softmax z) with respect to z is softmax(z) − q: rows sum to 0.
    let row_sums = Vec::<f32>::try_from(grad.sum_dim_intlist(-1, false, Kind::Float))?;
    ensure!(row_sums.iter().all(|s| s.abs() < 1e-6), "gradient rows do not sum to 0: {row_sums:?}");
    println!("3-token KL       : {:.6}", f64::try_from(&kl)?);
    let max_row_sum = row_sums.iter().fold(0f32, |m, s| m.max(s.abs()));
    println!("grad check       : max |row sum| = {max_row_sum:.1e} (softmax(z) - q sums to 0)");
    println!("smoke test passed");
    Ok(())
}
