//! WebSocket frame decoding on arbitrary bytes: what the control plane reads from every agent
//! socket, and the agent from the control plane. A frame that decodes must encode and decode
//! back to itself.
#![no_main]

use fleet_core::command::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        let again = Frame::decode(&frame.encode()).expect("an encoded frame decodes");
        assert_eq!(again, frame);
    }
});
