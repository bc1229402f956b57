//! Fuzz target `npz`: see `tarflow::fuzzing` for what it reaches.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tarflow::fuzzing::run("npz", data);
});
