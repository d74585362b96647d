//! AFL++ driver for [`strangler_fuzz::config`]: `fuzz/run.sh config SECONDS`.

fn main() {
    afl::fuzz!(|data: &[u8]| strangler_fuzz::config(data));
}
