//! Generates the Kotlin and Swift sources: `uniffi-bindgen generate --library <cdylib> ...`.
fn main() {
    uniffi::uniffi_bindgen_main()
}
