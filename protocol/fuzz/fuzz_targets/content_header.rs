//! Content headers are kept as the publisher's bytes and read lazily: any
//! payload is accepted or refused without panicking, and an accepted one
//! can be read and rebuilt (as dead-lettering does) without panicking.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren_protocol::content::ContentHeader;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = ContentHeader::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = (h.body_size(), h.delivery_mode(), h.priority(), h.is_persistent());
    let _ = (h.expiration(), h.reply_to(), h.user_id(), h.user_id_bytes());
    let _ = h.headers();
    let _ = h.properties();
    let same = h.rebuilt(h.has_headers().then(|| &[0u8, 0, 0, 0][..]), false);
    assert!(same.is_ok(), "a valid header with an empty table must rebuild");
    let _ = h.rebuilt(None, true);
});
