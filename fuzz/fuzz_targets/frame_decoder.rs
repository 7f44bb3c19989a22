//! Arbitrary bytes into the frame decoder, in arbitrary read sizes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    txmq_protocol::fuzzing::frame_decoder(data);
});
