use ferry_image::*;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Instant;
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
#[test]
fn bench() {
    let data: Vec<u8> = (0..(4usize << 20))
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect(); // 4 MiB run
    let n = 256; // 1 GiB
    let t = Instant::now();
    let mut w = ImageWriter::new(Box::new(std::io::sink()), Box::new(std::io::sink())).unwrap();
    for i in 0..n {
        w.pages(i as u64 * (4 << 20), &data).unwrap();
    }
    w.finish().unwrap();
    let dt = t.elapsed().as_secs_f64();
    println!(
        "write to sink: {:.2} GB/s",
        (n * data.len()) as f64 / dt / 1e9
    );
    // Small runs: 1 page each.
    let t = Instant::now();
    let mut w = ImageWriter::new(Box::new(std::io::sink()), Box::new(std::io::sink())).unwrap();
    for i in 0..(n * 1024) {
        w.pages(i as u64 * 4096, &data[..4096]).unwrap();
    }
    w.finish().unwrap();
    let dt = t.elapsed().as_secs_f64();
    println!(
        "write 1-page runs to sink: {:.2} GB/s",
        (n * data.len()) as f64 / dt / 1e9
    );

    let (m, p) = (Buf::default(), Buf::default());
    let mut w = ImageWriter::new(Box::new(m.clone()), Box::new(p.clone())).unwrap();
    for i in 0..n {
        w.pages(i as u64 * (4 << 20), &data).unwrap();
    }
    w.finish().unwrap();
    let (m, p) = (m.0.lock().unwrap().clone(), p.0.lock().unwrap().clone());
    for mode in 0..3 {
        for _ in 0..2 {
            let (m2, p2) = (m.clone(), p.clone());
            let t = Instant::now();
            let mut r =
                ImageReader::from_streams(Box::new(Cursor::new(m2)), Box::new(Cursor::new(p2)))
                    .unwrap();
            let t0 = t.elapsed();
            let mut buf = Vec::new();
            match mode {
                0 => {
                    r.verify_pages().unwrap();
                }
                1 => while r.next_pages_into(&mut buf).unwrap().is_some() {},
                _ => while r.next_pages().unwrap().is_some() {},
            }
            let dt = t.elapsed().as_secs_f64();
            println!(
                "mode {mode}: open {t0:?} {:.2} GB/s",
                p.len() as f64 / dt / 1e9
            );
        }
    }
    let t = Instant::now();
    let c = crc32fast::hash(&data);
    for _ in 1..n {
        std::hint::black_box(crc32fast::hash(std::hint::black_box(&data)));
    }
    println!(
        "crc32fast alone: {:.2} GB/s {c}",
        (n * data.len()) as f64 / t.elapsed().as_secs_f64() / 1e9
    );
}
