//! AFL++ driver for [`strangler_fuzz::proxy`]: `fuzz/run.sh proxy SECONDS`.

fn main() {
    afl::fuzz!(|data: &[u8]| strangler_fuzz::proxy(data));
}
