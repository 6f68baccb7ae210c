//! Data: the embedded synthetic language, tokenizers, `nanoseek data`, token shards and the batch loader.

pub mod codec;
pub mod loader;
pub mod location;
pub mod prepare;
pub mod shard;
mod sources;
pub mod synthetic;
pub mod tasks;
pub mod tokenizer;

pub use codec::TextCodec;
pub use loader::{Batch, Loader, TokenSource};
