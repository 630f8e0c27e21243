//! Password hashes in RabbitMQ's format, so that definitions carry users
//! between RabbitMQ and Warren both ways: `base64(salt ‖ H(salt ‖
//! utf8(password)))` with a 4-byte random salt, H being SHA-256
//! (`rabbit_password_hashing_sha256`, the default) or SHA-512
//! (`rabbit_password_hashing_sha512`). Comparison is in constant time.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256, Sha512};

/// RabbitMQ's names for the hashing algorithms.
pub const SHA256: &str = "rabbit_password_hashing_sha256";
pub const SHA512: &str = "rabbit_password_hashing_sha512";

/// A hashing algorithm RabbitMQ's definitions name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// From a definitions file's `hashing_algorithm` (absent: SHA-256, as
    /// RabbitMQ assumes).
    pub fn parse(name: Option<&str>) -> Result<Algorithm, String> {
        match name {
            None | Some(SHA256) => Ok(Algorithm::Sha256),
            Some(SHA512) => Ok(Algorithm::Sha512),
            Some("rabbit_password_hashing_md5") => {
                Err("hashing algorithm rabbit_password_hashing_md5 is not accepted (insecure); reset the password".into())
            }
            Some(other) => Err(format!("unknown hashing algorithm '{other}'")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => SHA256,
            Algorithm::Sha512 => SHA512,
        }
    }

    fn digest(self, salt: &[u8], password: &[u8]) -> Vec<u8> {
        match self {
            Algorithm::Sha256 => {
                let mut h = Sha256::new();
                h.update(salt);
                h.update(password);
                h.finalize().to_vec()
            }
            Algorithm::Sha512 => {
                let mut h = Sha512::new();
                h.update(salt);
                h.update(password);
                h.finalize().to_vec()
            }
        }
    }

    fn digest_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

/// Hash `password` with a fresh random salt (base64, RabbitMQ's format).
pub fn hash(alg: Algorithm, password: &str) -> String {
    let mut salt = [0u8; 4];
    if getrandom::fill(&mut salt).is_err() {
        // No system randomness: a time-derived salt still differs per call.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        salt = (t as u32).to_be_bytes();
    }
    hash_with_salt(alg, salt, password)
}

fn hash_with_salt(alg: Algorithm, salt: [u8; 4], password: &str) -> String {
    let mut out = salt.to_vec();
    out.extend(alg.digest(&salt, password.as_bytes()));
    B64.encode(out)
}

/// Check that `hash` (base64) is a well-formed hash for `alg`.
pub fn validate(alg: Algorithm, hash: &str) -> Result<(), String> {
    if hash.is_empty() {
        return Ok(()); // no password: password logins are refused
    }
    let raw = B64
        .decode(hash)
        .map_err(|e| format!("password_hash is not base64: {e}"))?;
    if raw.len() != 4 + alg.digest_len() {
        return Err(format!(
            "password_hash has {} bytes; {} needs {}",
            raw.len(),
            alg.name(),
            4 + alg.digest_len()
        ));
    }
    Ok(())
}

/// Whether `password` matches `hash`. An empty hash matches nothing.
pub fn verify(alg: Algorithm, hash: &str, password: &[u8]) -> bool {
    let Ok(raw) = B64.decode(hash) else {
        return false;
    };
    if raw.len() != 4 + alg.digest_len() {
        return false;
    }
    let (salt, want) = raw.split_at(4);
    let got = alg.digest(salt, password);
    constant_time_eq(&got, want)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rabbitmq_known_hash() {
        // RabbitMQ's own example: salt 908D C60A and password "test12"
        // (rabbit_password_hashing_sha256), from its documentation.
        let h = hash_with_salt(Algorithm::Sha256, [0x90, 0x8d, 0xc6, 0x0a], "test12");
        assert_eq!(h, "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR");
        assert!(verify(Algorithm::Sha256, &h, b"test12"));
        assert!(!verify(Algorithm::Sha256, &h, b"test13"));
    }

    #[test]
    fn round_trips_both_algorithms_with_random_salts() {
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let a = hash(alg, "s3cret");
            let b = hash(alg, "s3cret");
            assert_ne!(a, b, "salted");
            validate(alg, &a).unwrap();
            assert!(verify(alg, &a, b"s3cret"));
            assert!(!verify(alg, &a, b"s3cret "));
            assert!(!verify(alg, "", b""));
        }
        assert!(validate(Algorithm::Sha512, &hash(Algorithm::Sha256, "x")).is_err());
        assert!(validate(Algorithm::Sha256, "not base64!").is_err());
        assert!(Algorithm::parse(Some("rabbit_password_hashing_md5")).is_err());
        assert!(Algorithm::parse(Some("bogus")).is_err());
        assert_eq!(Algorithm::parse(None), Ok(Algorithm::Sha256));
    }
}
