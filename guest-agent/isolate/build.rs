//! Link arguments for the freestanding isolate guest (shared with the probe).

#[path = "../freestanding/link_args.rs"]
mod link_args;

fn main() {
    link_args::emit();
}
