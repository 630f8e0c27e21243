//! A small, explicit value encoding for stored records: fixed-width
//! big-endian integers and length-prefixed byte strings. Decoding checks
//! every length, so a corrupt record is an error, never a panic.

use crate::StoreError;

#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    /// What [`Writer::bytes`] writes for `b`.
    pub fn len_of(&self, b: &[u8]) -> usize {
        4 + b.len()
    }
}

pub struct Reader<'a>(pub &'a [u8]);

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("truncated record ({what})"))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(corrupt(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1, "u8")?[0])
    }
    pub fn u64(&mut self) -> Result<u64, StoreError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, "u64")?);
        Ok(u64::from_be_bytes(a))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let l = self.take(4, "length")?;
        let n = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
        self.take(n, "bytes")
    }
    pub fn string(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| StoreError::Corrupt("non UTF-8 name".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut w = Writer::default();
        w.u8(7).u64(1 << 40).str("héllo").bytes(b"");
        let buf = w.0;
        let mut r = Reader(&buf);
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u64().unwrap(), 1 << 40);
        assert_eq!(r.string().unwrap(), "héllo");
        assert_eq!(r.bytes().unwrap(), b"");
        for cut in 0..buf.len() {
            let mut r = Reader(&buf[..cut]);
            let ok = r
                .u8()
                .and_then(|_| r.u64())
                .and_then(|_| r.string())
                .and_then(|_| r.bytes().map(|_| ()));
            assert!(ok.is_err(), "cut {cut}");
        }
    }
}
