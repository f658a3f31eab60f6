//! Link arguments for the freestanding probe (shared with the isolate guest).

#[path = "../../../guest-agent/freestanding/link_args.rs"]
mod link_args;

fn main() {
    link_args::emit();
}
