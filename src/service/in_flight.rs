//! GenerateImage creates in flight upstream: the one place that admits a
//! create and knows when it ends. Each token may have at most
//! `--max-generates-per-token` creates in flight, so one caller cannot flood
//! Piclumen (and spend the account) with parallel generations; a create's
//! place is held by the create itself, however soon its caller gives up.

use crate::support::lock;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{error::Error, job::Token};

/// The creates in flight, counted per token. Cheap to share.
#[derive(Debug)]
pub(super) struct CreateLimit {
    limit: usize,
    counts: Arc<Mutex<HashMap<Token, usize>>>,
}

impl CreateLimit {
    /// At most `limit` creates in flight per token.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            counts: Arc::default(),
        }
    }

    /// Takes one of the token's places, or refuses with RESOURCE_EXHAUSTED
    /// when all are held. The place is freed when the slot is dropped, so a
    /// create holds it by owning the slot until it ends.
    pub(super) fn start(&self, token: &Token) -> Result<CreateSlot, Error> {
        let mut counts = lock(&self.counts);
        let n = counts.entry(token.clone()).or_insert(0);
        if *n >= self.limit {
            return Err(Error::ResourceExhausted(format!(
                "this token already has {} GenerateImage creates in flight; retry when one ends",
                self.limit
            )));
        }
        *n += 1;
        Ok(CreateSlot {
            token: token.clone(),
            counts: Arc::clone(&self.counts),
        })
    }
}

/// One create in flight for a token; frees its place on drop.
#[derive(Debug)]
pub(super) struct CreateSlot {
    token: Token,
    counts: Arc<Mutex<HashMap<Token, usize>>>,
}

impl Drop for CreateSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.token);
            }
        }
    }
}
