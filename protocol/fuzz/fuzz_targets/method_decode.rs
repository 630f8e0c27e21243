//! Method decoding: the hand-written hot-path decoders and the guard in
//! front of amq-protocol's parser. Any payload gives a method or an error
//! with a reply code, never a panic or unbounded recursion.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren_protocol::method;

fuzz_target!(|data: &[u8]| {
    match method::decode(&Bytes::copy_from_slice(data)) {
        Ok(_) => {}
        Err(e) => {
            let code = e.reply_code();
            assert!((500..=540).contains(&code), "{code}");
        }
    }
});
