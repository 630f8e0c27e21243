//! The frame checker sees every byte a peer sends before anything else does:
//! it must never panic, and a frame it accepts must lie inside the buffer,
//! fit frame_max and end with the frame-end octet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_protocol::frame::{self, FRAME_END, OVERHEAD};

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose frame_max (as small as 0, as large as 64 KiB).
    let (max, buf) = match data {
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]) as u32, rest),
        _ => (8192, data),
    };
    if let Ok(Some((h, total))) = frame::check(buf, max) {
        assert!(total <= buf.len());
        assert!(total >= OVERHEAD);
        assert!((h.size as usize) + OVERHEAD == total);
        assert!(h.size as u64 + OVERHEAD as u64 <= max as u64);
        assert_eq!(buf[total - 1], FRAME_END);
    }
});
