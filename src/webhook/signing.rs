//! Standard Webhooks signatures (`webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `<webhook-id>.<webhook-timestamp>.<body>`, the key being the secret's base64 after
//! `whsec_`), computed with ring's HMAC.
//!
//! Why not the `standardwebhooks` crate's `sign`: it copies the whole body into a new
//! string first and hashes with a portable SHA-256, which was about 72% of the delivery
//! thread's CPU under load (ring uses the CPU's SHA instructions where it has them). The
//! crate still defines the format here: the tests check every signature against it, and
//! the integration tests against the Python implementation.

use base64::Engine;

/// A webhook's signing key.
pub(super) struct Signer {
    key: ring::hmac::Key,
}

impl Signer {
    /// The key of a `whsec_…` secret (the prefix is optional, as in the specification's
    /// libraries).
    pub(super) fn new(secret: &str) -> Result<Signer, base64::DecodeError> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = base64::engine::general_purpose::STANDARD.decode(encoded)?;
        Ok(Signer {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        })
    }

    /// The `webhook-signature` header's value.
    pub(super) fn sign(&self, message_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut context = ring::hmac::Context::with_key(&self.key);
        context.update(message_id.as_bytes());
        context.update(b".");
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        let tag = context.sign();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_the_standardwebhooks_crates() {
        // The specification's own example, then generated secrets and bodies of every
        // size around SHA-256's block.
        let example = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        assert_eq!(
            Signer::new(example).expect("secret").sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                body
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
        for len in [0, 1, 55, 56, 63, 64, 65, 1000, 70_000] {
            let secret = super::super::new_secret();
            let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let id = format!("01J{len:023}");
            let reference = standardwebhooks::Webhook::new(&secret)
                .expect("secret")
                .sign(&id, 1_700_000_000 + len as i64, &body)
                .expect("sign");
            let ours =
                Signer::new(&secret)
                    .expect("secret")
                    .sign(&id, 1_700_000_000 + len as i64, &body);
            assert_eq!(ours, reference, "body of {len} bytes");
        }
    }

    #[test]
    fn a_secret_that_is_not_base64_is_refused() {
        assert!(Signer::new("whsec_not base64!").is_err());
    }
}
