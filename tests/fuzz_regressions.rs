//! Replays every committed fuzz input (`fuzz/seeds/*` and the crashes turned regressions in
//! `fuzz/regressions/*`) through the same harness the fuzzers run (`tarflow::fuzzing`): each
//! must return, not panic. The hdf5 target runs only with `--features hdf5`.

use std::path::Path;

#[test]
fn committed_fuzz_inputs_never_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(targets) = std::fs::read_dir(root.join(kind)) else {
            continue;
        };
        for t in targets.flatten() {
            let target = t.file_name().to_string_lossy().into_owned();
            if target == "hdf5" && !cfg!(feature = "hdf5") {
                continue;
            }
            for f in std::fs::read_dir(t.path()).unwrap().flatten() {
                let data = std::fs::read(f.path()).unwrap();
                assert!(
                    tarflow::fuzzing::run(&target, &data),
                    "unknown fuzz target folder {target}"
                );
                replayed += 1;
            }
        }
    }
    tarflow::fuzzing::remove_scratch();
    assert!(replayed >= 15, "only {replayed} inputs found");
}
