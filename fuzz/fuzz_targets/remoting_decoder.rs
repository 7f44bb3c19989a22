//! Arbitrary bytes into the Remoting face's decoder (issue 27), in read sizes the first
//! byte picks; each frame that decodes has its body read as a batch, as properties and
//! its fields as message ids: nothing may panic. `proptest` runs the same in the suite
//! (`faces::remoting::frame::tests::no_input_panics`, `record::tests`).
#![no_main]

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use txmq_broker::faces::remoting::{frame, record};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (step, rest) = match data.split_first() {
        Some((first, rest)) => (usize::from(*first) + 1, rest),
        None => return,
    };
    let mut codec = frame::Codec::new(1 << 20);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(command)) => {
                    let _ = record::batch(command.body.clone(), 10_000);
                    let _ = record::properties(&String::from_utf8_lossy(&command.body));
                    for value in command.ext.values() {
                        let _ = record::parse_message_id(value);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
