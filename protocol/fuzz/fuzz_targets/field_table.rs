//! The field-table validator's promise: a table it accepts is one
//! amq-protocol's recursive parser reads without error (so the parser never
//! sees a table that could hurt it), and it never panics itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_protocol::table;
use warren_protocol::types::parsing::parse_field_table;

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = table::skip_table(data) {
        assert!(n <= data.len());
        let parsed = parse_field_table(&data[..n]);
        assert!(parsed.is_ok(), "validated table refused by the parser");
    }
});
