//! Field values compared as RabbitMQ compares them: numbers by value,
//! whatever their wire width or type (a binding's `LongLongInt 2` matches a
//! header's `LongInt 2`), strings by bytes. Used by headers matching, queue
//! argument equivalence and the integer arguments (`x-priority`, `x-death`
//! counts). No I/O, no broker state: the bottom layer.

use warren_protocol::types::AMQPValue;

/// A value normalised for comparison.
#[derive(PartialEq)]
enum Norm<'a> {
    Int(i128),
    Float(f64),
    Bytes(&'a [u8]),
    Other(&'a AMQPValue),
}

fn norm(v: &AMQPValue) -> Norm<'_> {
    match v {
        AMQPValue::ShortShortInt(x) => Norm::Int(*x as i128),
        AMQPValue::ShortShortUInt(x) => Norm::Int(*x as i128),
        AMQPValue::ShortInt(x) => Norm::Int(*x as i128),
        AMQPValue::ShortUInt(x) => Norm::Int(*x as i128),
        AMQPValue::LongInt(x) => Norm::Int(*x as i128),
        AMQPValue::LongUInt(x) => Norm::Int(*x as i128),
        AMQPValue::LongLongInt(x) => Norm::Int(*x as i128),
        AMQPValue::Timestamp(x) => Norm::Int(*x as i128),
        AMQPValue::Float(x) => Norm::Float(*x as f64),
        AMQPValue::Double(x) => Norm::Float(*x),
        AMQPValue::LongString(s) => Norm::Bytes(s.as_bytes()),
        AMQPValue::ShortString(s) => Norm::Bytes(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Norm::Bytes(b.as_slice()),
        other => Norm::Other(other),
    }
}

/// An integer field value, whatever its wire width.
pub fn as_int(v: &AMQPValue) -> Option<i128> {
    match norm(v) {
        Norm::Int(i) => Some(i),
        _ => None,
    }
}

/// A string field value (long or short string), lossily as UTF-8.
pub fn as_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Whether two field values are equal in RabbitMQ's sense.
pub fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (norm(a), norm(b)) {
        (Norm::Int(x), Norm::Float(y)) | (Norm::Float(y), Norm::Int(x)) => x as f64 == y,
        (x, y) => x == y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_by_value_across_widths() {
        assert!(values_equal(
            &AMQPValue::LongInt(2),
            &AMQPValue::LongLongInt(2)
        ));
        assert!(values_equal(
            &AMQPValue::ShortInt(2),
            &AMQPValue::Double(2.0)
        ));
        assert!(!values_equal(
            &AMQPValue::LongInt(2),
            &AMQPValue::LongInt(3)
        ));
        assert!(values_equal(
            &AMQPValue::LongString("a".into()),
            &AMQPValue::ShortString("a".into())
        ));
        assert_eq!(as_int(&AMQPValue::ShortShortUInt(200)), Some(200));
        assert_eq!(as_int(&AMQPValue::LongString("1".into())), None);
    }
}
