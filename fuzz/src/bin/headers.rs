//! AFL++ driver for [`strangler_fuzz::headers`]: `fuzz/run.sh headers SECONDS`.

fn main() {
    afl::fuzz!(|data: &[u8]| strangler_fuzz::headers(data));
}
