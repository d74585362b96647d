//! AFL++ driver for [`strangler_fuzz::compare`]: `fuzz/run.sh compare SECONDS`.

fn main() {
    afl::fuzz!(|data: &[u8]| strangler_fuzz::compare(data));
}
