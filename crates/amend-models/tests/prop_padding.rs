//! Property: any batch of sequences, padded on either side, gives each row the logits it gets
//! alone; masked positions never change real ones.

mod common;

use amend_models::tokenizer::{PaddingSide, pad_batch};
use amend_models::{CausalLm, LoadOptions, Model, load};
use common::model_dir;
use proptest::prelude::*;
use tch::Tensor;

thread_local! {
    // Tensors are not `Sync`; each test thread loads its own copies.
    static MODELS: Vec<(String, Model)> = ["gpt2", "llama", "mistral", "qwen2_sliding"]
        .iter()
        .map(|n| (n.to_string(), load(model_dir(n), &LoadOptions::default()).unwrap()))
        .collect();
}

fn arbitrary_batch() -> impl Strategy<Value = Vec<Vec<u32>>> {
    prop::collection::vec(prop::collection::vec(0u32..320, 1..12), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn padded_rows_equal_unpadded_rows(seqs in arbitrary_batch(), left in any::<bool>(), pad in 0u32..320, which in 0usize..4) {
        MODELS.with(|models| -> Result<(), TestCaseError> {
        let (name, model) = &models[which];
        let side = if left { PaddingSide::Left } else { PaddingSide::Right };
        let batch = pad_batch(&seqs, pad, side, tch::Device::Cpu).unwrap();
        let logits = model.forward_no_grad(&batch.input_ids, Some(&batch.attention_mask)).unwrap();
        let t = logits.size()[1];
        for (j, s) in seqs.iter().enumerate() {
            let n = s.len() as i64;
            let ids = Tensor::from_slice(&s.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()).view([1, n]);
            let alone = model.forward_no_grad(&ids, None).unwrap();
            let start = if left { t - n } else { 0 };
            let got = logits.get(j as i64).narrow(0, start, n);
            let diff = (got - alone.get(0)).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-4, "{name} {side:?} row {j}: max diff {diff}");
        }
        prop_assert!(logits.isfinite().all().int64_value(&[]) == 1);
        Ok(())
        })?;
    }
}
