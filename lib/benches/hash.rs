//! Benchmark: content-hashing a large stage input (a 512 MiB file, the size of a
//! model checkpoint), memory-mapped on all cores as the stages do, against one core
//! streaming, and against Python's hashlib (blake2b, its fastest) on the same file.

use std::io::Write;
use std::time::Instant;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let mib = 512;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for _ in 0..mib {
            f.write_all(&block).unwrap();
        }
    }
    let gbs = |secs: f64| mib as f64 / 1024.0 / secs;
    // Warm the page cache so every contender reads from memory.
    quark::stage::hash_file(&path).unwrap();

    let t = Instant::now();
    let parallel = quark::stage::hash_file(&path).unwrap();
    let t_par = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(&path).unwrap())
        .unwrap();
    let serial = h.finalize();
    let t_ser = t.elapsed().as_secs_f64();
    assert_eq!(parallel, serial);

    let script = "import hashlib,sys,time\nt=time.perf_counter()\nh=hashlib.blake2b()\nf=open(sys.argv[1],'rb')\nwhile b:=f.read(1<<20): h.update(b)\nprint(time.perf_counter()-t)";
    let out = quark::testing::run_python(script, &[path.as_os_str()]);
    let t_py: f64 = out.trim().parse().unwrap();

    println!("hash 512 MiB: blake3 all cores {:.2} GB/s ({t_par:.3} s), one core streaming {:.2} GB/s, Python hashlib.blake2b {:.2} GB/s", gbs(t_par), gbs(t_ser), gbs(t_py));
    println!(
        "hash ratio: {:.1}x Python, {:.2}x one core ({} threads)",
        t_py / t_par,
        t_ser / t_par,
        rayon::current_num_threads()
    );
}
