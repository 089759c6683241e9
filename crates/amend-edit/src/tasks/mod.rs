//! Embedded synthetic tasks with a known answer, used as the defaults of `amend edit` and by the
//! comparison crate.

pub mod facts;

pub use facts::default_model_cache;
