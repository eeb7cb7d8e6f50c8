//! Where the hub gets job states from: the `StatusSource` trait, with the
//! Piclumen client as its production implementation and scripted fakes in
//! tests. The hub depends on this trait, not on HTTP.

use std::sync::Arc;

use crate::{
    job::Token,
    upstream::{BoxFuture, Upstream, UpstreamError},
};

pub use crate::upstream::{BadEntry, StatusEntry as Entry};

/// Answers batch-status questions for one token at a time.
pub trait StatusSource: Send + Sync + 'static {
    /// The states of `ids` for `token`; ids absent from the answer are
    /// unknown to the token's account.
    fn batch_status(
        &self,
        token: &Token,
        ids: &[Arc<str>],
    ) -> BoxFuture<Result<Vec<Entry>, UpstreamError>>;
}

impl StatusSource for Arc<dyn Upstream> {
    fn batch_status(
        &self,
        token: &Token,
        ids: &[Arc<str>],
    ) -> BoxFuture<Result<Vec<Entry>, UpstreamError>> {
        Upstream::batch_status(&**self, token, ids)
    }
}
