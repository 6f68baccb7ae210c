//! Data: the embedded synthetic language, token shards and the batch loader.

pub mod loader;
pub mod shard;
pub mod synthetic;

pub use loader::{Batch, Loader, TokenSource};
