//! Data: the embedded synthetic language, token shards and the batch loader.

pub mod codec;
pub mod loader;
pub mod shard;
pub mod synthetic;

pub use codec::TextCodec;
pub use loader::{Batch, Loader, TokenSource};
