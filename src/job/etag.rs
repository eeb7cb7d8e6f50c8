//! A job state's etag: an opaque tag of what a caller sees of the job
//! (state, queue position, images, upstream status, prompt id), derived from
//! that content alone, so every replica and every build gives the same tag
//! for the same state, and `observed_at` (when the state was confirmed)
//! leaves it unchanged.
//!
//! The hash is 64-bit FNV-1a over a fixed, length-prefixed encoding of
//! those fields: a published algorithm with fixed constants (std's hasher
//! is randomly keyed per process), and cheap enough (a few hundred
//! instructions for a typical state) to compute on every answer instead of
//! storing it with the state. An etag only tells one job's states apart,
//! and is no security boundary: FNV-1a changes its output for any change
//! confined to one byte position, and two different states collide with a
//! chance of about 2^-64 (the worst a collision does is let a waiting
//! check wait until its `wait` ends).

use std::fmt;

use super::{JobState, JobStatus};

/// FNV-1a's 64-bit offset basis and prime.
const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;
/// Changing the encoding below changes this, so tags never collide across it.
const VERSION: &str = "piclumen.v1.etag.1";

/// A state's etag; shown as 16 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Etag(u64);

impl Etag {
    /// True when `text` (as a caller sends it back) is this tag.
    pub fn is(&self, text: &str) -> bool {
        text.len() == 16 && u64::from_str_radix(text, 16).is_ok_and(|v| v == self.0)
    }
}

impl fmt::Display for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl JobStatus {
    /// The state's etag.
    pub fn etag(&self) -> Etag {
        // Destructured, so a new field must be placed in or out of the tag.
        let Self {
            mark_id,
            state,
            queue_position,
            images,
            upstream_status,
            prompt_id,
            observed_at: _,
        } = self;
        let mut h = Fnv(OFFSET);
        h.text(VERSION);
        h.text(mark_id);
        // Fixed codes, not the enum's order, which a new state could move.
        h.bytes(&[match state {
            JobState::Unknown => 0,
            JobState::Pending => 1,
            JobState::Running => 2,
            JobState::Succeeded => 3,
            JobState::Failed => 4,
        }]);
        h.bytes(&queue_position.to_le_bytes());
        h.text(upstream_status);
        h.text(prompt_id);
        h.bytes(&(images.len() as u64).to_le_bytes());
        for image in images {
            h.text(&image.url);
            h.text(&image.name);
            h.bytes(&image.width.to_le_bytes());
            h.bytes(&image.height.to_le_bytes());
            h.bytes(&[u8::from(image.nsfw)]);
        }
        Etag(h.0)
    }
}

struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(PRIME);
        }
    }

    /// A string, length first, so that no two field lists encode alike.
    fn text(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::Fnv;
    use crate::job::{Image, JobState, JobStatus};

    fn running() -> JobStatus {
        JobStatus {
            mark_id: "m-1".into(),
            state: JobState::Running,
            queue_position: 0,
            images: Vec::new(),
            upstream_status: "running".into(),
            prompt_id: "p-1".into(),
            observed_at: None,
        }
    }

    #[test]
    fn the_hash_is_fnv_1a() {
        // The published test vectors of 64-bit FNV-1a.
        for (input, want) in [
            ("", 0xcbf2_9ce4_8422_2325_u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
        ] {
            let mut h = Fnv(super::OFFSET);
            h.bytes(input.as_bytes());
            assert_eq!(h.0, want, "{input:?}");
        }
    }

    #[test]
    fn the_tag_is_fixed_by_the_content_across_builds() {
        // Pinned: a change here changes every deployed etag, so callers
        // waiting with an old one would all be answered at once.
        let tag = running().etag();
        assert_eq!(tag.to_string(), "637232dc89e748ce");
        assert!(tag.is("637232dc89e748ce") && tag.is("637232DC89E748CE"));
        assert!(!tag.is("") && !tag.is("\"637232dc89e748ce\"") && !tag.is("x"));
    }

    #[test]
    fn every_visible_field_changes_it_and_observed_at_does_not() {
        let base = running();
        let confirmed = JobStatus {
            observed_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(9)),
            ..base.clone()
        };
        assert_eq!(confirmed.etag(), base.etag());
        let image = Image {
            url: "u".into(),
            name: "n".into(),
            width: 1,
            height: 1,
            nsfw: false,
        };
        let changed = [
            JobStatus {
                state: JobState::Pending,
                ..base.clone()
            },
            JobStatus {
                queue_position: 3,
                ..base.clone()
            },
            JobStatus {
                images: vec![image.clone()],
                ..base.clone()
            },
            JobStatus {
                images: vec![Image {
                    nsfw: true,
                    ..image.clone()
                }],
                ..base.clone()
            },
            JobStatus {
                images: vec![Image { width: 2, ..image }],
                ..base.clone()
            },
            JobStatus {
                upstream_status: "queued".into(),
                ..base.clone()
            },
            JobStatus {
                prompt_id: "p-2".into(),
                ..base.clone()
            },
            JobStatus {
                mark_id: "m-2".into(),
                ..base.clone()
            },
        ];
        let mut seen = std::collections::HashSet::from([base.etag()]);
        for status in changed {
            assert!(seen.insert(status.etag()), "{status:?}");
        }
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        let a = JobStatus {
            upstream_status: "ab".into(),
            prompt_id: "c".into(),
            ..running()
        };
        let b = JobStatus {
            upstream_status: "a".into(),
            prompt_id: "bc".into(),
            ..running()
        };
        assert_ne!(a.etag(), b.etag());
    }
}
