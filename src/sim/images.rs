//! The images finished jobs' URLs lead to: `GET /_sim/images/<markId>-<i>.png`
//! answers a real PNG of the job's size (a gradient), encoded once per size
//! and kept in a small cache.

use std::{collections::HashMap, sync::Mutex};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::time::Instant;

use super::{Sim, lock};

/// Where the image route lives.
const IMAGES_PATH: &str = "/_sim/images/";
/// Largest image side the simulator draws (the server's own limit).
const MAX_IMAGE_SIDE: i64 = 4096;
/// How many image sizes stay encoded in memory.
const KEEP_IMAGE_SIZES: usize = 16;

/// Encoded images by (width, height): every job of one size shares one.
#[derive(Debug, Default)]
pub(super) struct Cache(Mutex<HashMap<(u32, u32), Bytes>>);

/// The name of image `index` of job `mark_id`.
pub(super) fn name(mark_id: &str, index: i64) -> String {
    format!("{mark_id}-{index}.png")
}

/// The URL of image `name` on the simulator at `host`.
pub(super) fn url(host: &str, name: &str) -> String {
    format!("http://{host}{IMAGES_PATH}{name}")
}

/// The job and index an image name (`<markId>-<i>.png`) stands for.
fn parse(name: &str) -> Option<(&str, i64)> {
    let (mark_id, index) = name.strip_suffix(".png")?.rsplit_once('-')?;
    Some((mark_id, index.parse().ok()?))
}

/// A finished job's image, as PNG.
pub(super) async fn image(State(sim): State<Sim>, Path(name): Path<String>) -> Response {
    let size = parse(&name).and_then(|(mark_id, index)| {
        let (width, height) = sim.world().image_size(Instant::now(), mark_id, index)?;
        let side = |v: i64| u32::try_from(v.clamp(1, MAX_IMAGE_SIDE)).ok();
        Some((side(width)?, side(height)?))
    });
    let Some(size) = size else {
        return (StatusCode::NOT_FOUND, "no such image").into_response();
    };
    let cached = lock(&sim.images.0).get(&size).cloned();
    let png = match cached {
        Some(png) => png,
        None => {
            // Encoding takes a while for big images: off the async threads.
            let Ok(Ok(png)) = tokio::task::spawn_blocking(move || gradient_png(size)).await else {
                return (StatusCode::INTERNAL_SERVER_ERROR, "cannot draw the image")
                    .into_response();
            };
            let mut images = lock(&sim.images.0);
            if images.len() >= KEEP_IMAGE_SIZES {
                images.clear();
            }
            images.insert(size, png.clone());
            png
        }
    };
    ([(header::CONTENT_TYPE, "image/png")], png).into_response()
}

/// A left-to-right gradient: every row alike, so it compresses to little.
fn gradient_png((width, height): (u32, u32)) -> Result<Bytes, png::EncodingError> {
    let row: Vec<u8> = (0..width)
        .flat_map(|x| {
            let t = u8::try_from(u64::from(x) * 255 / u64::from(width.max(2) - 1)).unwrap_or(255);
            [t, 96, 255 - t]
        })
        .collect();
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    encoder.set_filter(png::Filter::Up);
    let mut writer = encoder.write_header()?;
    {
        let mut stream = writer.stream_writer()?;
        for _ in 0..height {
            std::io::Write::write_all(&mut stream, &row)?;
        }
        stream.finish()?;
    }
    writer.finish()?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Width, height and RGB pixels of a PNG.
    pub(in crate::sim) fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
        let mut reader = decoder.read_info().expect("png header");
        let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
        let frame = reader.next_frame(&mut pixels).expect("png frame");
        pixels.truncate(frame.buffer_size());
        (frame.width, frame.height, pixels)
    }

    #[test]
    fn gradient_png_of_the_default_size_is_small_and_decodes() {
        let bytes = gradient_png((1344, 768)).expect("encode");
        let (width, height, pixels) = decode_png(&bytes);
        assert_eq!((width, height), (1344, 768));
        assert_eq!(&pixels[..3], &[0, 96, 255], "gradient starts blue");
        assert_eq!(&pixels[1343 * 3..1344 * 3], &[255, 96, 0], "ends red");
        assert!(bytes.len() < 16 * 1024, "{} bytes", bytes.len());
    }

    #[test]
    fn image_names_parse_back_to_their_job_and_index() {
        assert_eq!(parse(&name("ab", 3)), Some(("ab", 3)));
        assert_eq!(parse("a-b-1.png"), Some(("a-b", 1)));
        for bad in ["ab-1.webp", "ab.png", "ab-x.png", "nothing"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
