//! The vendored DejaVu Sans font for plotters (no system fontconfig/freetype needed).

use std::sync::Once;

static FONT: Once = Once::new();

/// Registers DejaVu Sans as plotters' "sans-serif" once per process.
pub fn register() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // The font is compiled in and known good; were registration to fail, labels would be
        // missing from the pictures, not wrong.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes);
    });
}
