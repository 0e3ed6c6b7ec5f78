//! `page-server --serve IMAGE --listen ADDR`: see `page_server::cli`.

fn main() {
    std::process::exit(page_server::cli::main());
}
