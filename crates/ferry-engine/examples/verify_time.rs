use std::time::Instant;
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    for _ in 0..5 {
        let t = Instant::now();
        let m = ferry_sys::mem::MappedFile::open(&dir.join("pages.fimg")).unwrap();
        let t1 = t.elapsed();
        let (r, _map) = ferry_engine::restore::open_mapped(&dir).unwrap();
        let t2 = t.elapsed();
        let imgs = ferry_engine::restore::load(&dir, &r).unwrap();
        let t3 = t.elapsed();
        drop(m);
        println!(
            "mapped {:?} open_mapped {:?} load {:?} ({} procs)",
            t1,
            t2 - t1,
            t3 - t2,
            imgs.len()
        );
    }
}
