//! Arbitrary frame bodies into the request decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    txmq_protocol::fuzzing::request_decoder(data);
});
