//! drydock's incremental frame decoder, fed the bytes in pieces whose
//! sizes the input's first byte chooses (as a link hands them over).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let mut d = drydock_helper::proto::Decoder::default();
    for piece in rest.chunks(step.max(1) as usize) {
        d.feed(piece);
        loop {
            match d.next_msg() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
