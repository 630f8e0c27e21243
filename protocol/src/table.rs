//! Structural validation of AMQP field tables and arrays, iterative-depth
//! bounded, run before any table reaches amq-protocol's recursive parser (which
//! overflows the stack on deep nesting). Accepts exactly the value tags that
//! amq-protocol (and RabbitMQ) accept.

/// Deepest nesting of tables/arrays accepted. Real clients use a handful of
/// levels; amq-protocol's parser needs tens of KiB of stack per level in debug
/// builds, so the limit stays far below what a 2 MiB task stack can hold.
pub const MAX_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Ran past the end of the input or of an enclosing length.
    Truncated,
    /// A value tag no AMQP 0-9-1 peer defines.
    BadType(u8),
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A short string (a key) that is not UTF-8.
    BadUtf8,
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::Truncated => f.write_str("truncated field table"),
            TableError::BadType(t) => write!(f, "unknown field value type 0x{t:02x}"),
            TableError::TooDeep => write!(f, "field table nested deeper than {MAX_DEPTH}"),
            TableError::BadUtf8 => f.write_str("field table key is not valid UTF-8"),
        }
    }
}

fn take(buf: &[u8], n: usize) -> Result<(&[u8], &[u8]), TableError> {
    if buf.len() < n {
        return Err(TableError::Truncated);
    }
    Ok(buf.split_at(n))
}

fn long_len(buf: &[u8]) -> Result<(usize, &[u8]), TableError> {
    let (l, rest) = take(buf, 4)?;
    Ok((u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize, rest))
}

/// Validate a short string (length octet + UTF-8 bytes); returns bytes consumed.
pub fn skip_short_str(buf: &[u8]) -> Result<usize, TableError> {
    let (l, rest) = take(buf, 1)?;
    let (s, _) = take(rest, l[0] as usize)?;
    std::str::from_utf8(s).map_err(|_| TableError::BadUtf8)?;
    Ok(1 + l[0] as usize)
}

/// A short string's extent, whatever its bytes (message properties are
/// carried as bytes, as RabbitMQ carries them); returns bytes consumed.
pub fn skip_short_bytes(buf: &[u8]) -> Result<usize, TableError> {
    let (l, rest) = take(buf, 1)?;
    take(rest, l[0] as usize)?;
    Ok(1 + l[0] as usize)
}

/// Validate a field table (u32 length, then key/value pairs) at the front of
/// `buf`; returns the bytes it occupies including its length prefix.
pub fn skip_table(buf: &[u8]) -> Result<usize, TableError> {
    skip_table_at(buf, 1)
}

fn skip_table_at(buf: &[u8], depth: usize) -> Result<usize, TableError> {
    if depth > MAX_DEPTH {
        return Err(TableError::TooDeep);
    }
    let (len, rest) = long_len(buf)?;
    let (mut body, _) = take(rest, len)?;
    while !body.is_empty() {
        let k = skip_short_str(body)?;
        body = &body[k..];
        let v = skip_value(body, depth)?;
        body = &body[v..];
    }
    Ok(4 + len)
}

fn skip_array_at(buf: &[u8], depth: usize) -> Result<usize, TableError> {
    if depth > MAX_DEPTH {
        return Err(TableError::TooDeep);
    }
    let (len, rest) = long_len(buf)?;
    let (mut body, _) = take(rest, len)?;
    while !body.is_empty() {
        let v = skip_value(body, depth)?;
        body = &body[v..];
    }
    Ok(4 + len)
}

/// A tagged value; returns bytes consumed including the tag.
fn skip_value(buf: &[u8], depth: usize) -> Result<usize, TableError> {
    let (t, rest) = take(buf, 1)?;
    let n = match t[0] {
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'L' | b'l' | b'd' | b'T' => 8,
        b'D' => 5,
        b'V' => 0,
        b'S' | b'x' => {
            let (len, _) = long_len(rest)?;
            4 + len
        }
        b'A' => return Ok(1 + skip_array_at(rest, depth + 1)?),
        b'F' => return Ok(1 + skip_table_at(rest, depth + 1)?),
        other => return Err(TableError::BadType(other)),
    };
    take(rest, n)?;
    Ok(1 + n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A table nesting `levels` tables, each `{"k": <inner>}`.
    pub(crate) fn nested(levels: usize) -> Vec<u8> {
        let mut inner: Vec<u8> = vec![0, 0, 0, 0];
        for _ in 0..levels {
            let mut t = Vec::new();
            let body_len = 2 + 1 + inner.len();
            t.extend_from_slice(&(body_len as u32).to_be_bytes());
            t.extend_from_slice(&[1, b'k', b'F']);
            t.extend_from_slice(&inner);
            inner = t;
        }
        inner
    }

    #[test]
    fn shallow_tables_pass_and_deep_ones_fail() {
        assert_eq!(skip_table(&nested(0)), Ok(4));
        let ok = nested(MAX_DEPTH - 1);
        assert_eq!(skip_table(&ok), Ok(ok.len()));
        assert_eq!(skip_table(&nested(5000)), Err(TableError::TooDeep));
    }

    #[test]
    fn matches_amq_protocol_encoding() {
        use amq_protocol::types::*;
        let mut inner = FieldTable::default();
        inner.insert("x".into(), AMQPValue::LongString("y".into()));
        let mut t = FieldTable::default();
        t.insert("bool".into(), AMQPValue::Boolean(true));
        t.insert("i8".into(), AMQPValue::ShortShortInt(-1));
        t.insert("u16".into(), AMQPValue::ShortUInt(9));
        t.insert("i64".into(), AMQPValue::LongLongInt(-5));
        t.insert("f".into(), AMQPValue::Float(1.5));
        t.insert("d".into(), AMQPValue::Double(2.5));
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 314,
            }),
        );
        t.insert("ts".into(), AMQPValue::Timestamp(7));
        t.insert("bytes".into(), AMQPValue::ByteArray(vec![1, 2, 3].into()));
        t.insert("void".into(), AMQPValue::Void);
        t.insert("tbl".into(), AMQPValue::FieldTable(inner.clone()));
        t.insert(
            "arr".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(inner), AMQPValue::LongInt(3)].into()),
        );
        let bytes = cookie_factory::gen_simple(
            amq_protocol::types::generation::gen_field_table(&t),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(skip_table(&bytes), Ok(bytes.len()));
        for cut in 0..bytes.len() {
            assert_eq!(
                skip_table(&bytes[..cut]),
                Err(TableError::Truncated),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn bad_tag_and_bad_key() {
        let t = [0, 0, 0, 3, 1, b'k', b'?'];
        assert_eq!(skip_table(&t), Err(TableError::BadType(b'?')));
        let t = [0, 0, 0, 3, 1, 0xff, b'V'];
        assert_eq!(skip_table(&t), Err(TableError::BadUtf8));
        // A value whose own length runs past the table's.
        let t = [0, 0, 0, 7, 1, b'k', b'S', 0, 0, 0, 9];
        assert_eq!(skip_table(&t), Err(TableError::Truncated));
    }
}
