//! The sandbox against hostile functions, with a real `python3`: each is contained, recorded
//! with its reason, and the pool answers the next job.

use std::sync::Mutex;

use serde_json::{Value, json};

use super::*;

fn config() -> SandboxConfig {
    SandboxConfig {
        timeout_s: 1.0,
        workers: Some(2),
        ..SandboxConfig::default()
    }
}

/// Run each source on `inputs` through one pool; results in job order.
fn run_all(sources: &[&str], inputs: Vec<Value>) -> Vec<JobResult> {
    let pool = Pool::new(&config()).expect("python3 on PATH");
    let jobs: Vec<Job> = sources
        .iter()
        .map(|s| Job {
            source: s.to_string(),
            inputs: inputs.clone(),
        })
        .collect();
    let out: Mutex<Vec<Option<JobResult>>> = Mutex::new(vec![None; jobs.len()]);
    pool.run(&jobs, &|| false, &|i, r| {
        out.lock().unwrap()[i] = Some(r.clone());
        Ok(())
    })
    .unwrap();
    out.into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every job answered"))
        .collect()
}

const GOOD: &str = "def evaluate(response):\n    return len(response) > 3\n";

/// The call of a one-input job.
fn only(r: &JobResult) -> &Call {
    r.calls[0].as_ref().expect("called")
}

#[test]
fn a_plain_function_answers_with_python_values() {
    let r = run_all(&[GOOD], vec![json!("abcd"), json!("ab")]);
    assert!(r[0].compile.ok && r[0].compile.has_evaluate);
    let calls: Vec<&Call> = r[0].calls.iter().map(|c| c.as_ref().unwrap()).collect();
    assert_eq!(calls[0].outcome, Outcome::Ok);
    assert_eq!(calls[0].value, Some(json!(true)));
    assert_eq!(calls[1].value, Some(json!(false)));
    assert!(calls[0].eq_true && !calls[0].eq_false && calls[1].eq_false);
    assert_eq!((calls[0].as_int, calls[1].as_int), (Some(1), Some(0)));
}

#[test]
fn hostile_functions_are_contained_and_the_pool_goes_on() {
    // (source, expected outcome, words the reason must contain)
    let cases: &[(&str, Outcome, &str)] = &[
        (
            "def evaluate(r):\n    while True:\n        pass\n",
            Outcome::Timeout,
            "timed out",
        ),
        // Swallows the timeout exception and keeps looping: the worker kills the child.
        (
            "import time\ndef evaluate(r):\n    while True:\n        try:\n            time.sleep(10)\n        except BaseException:\n            pass\n",
            Outcome::Timeout,
            "killed",
        ),
        (
            "def evaluate(r):\n    x = bytearray(10 * 1024**3)\n    return True\n",
            Outcome::Error,
            "",
        ),
        (
            "import socket\ndef evaluate(r):\n    s = socket.socket()\n    s.connect(('127.0.0.1', 9))\n    return True\n",
            Outcome::Refused,
            "socket",
        ),
        (
            "def evaluate(r):\n    open('/tmp/ifloom-sandbox-escape', 'w').write('x')\n    return True\n",
            Outcome::Refused,
            "write outside",
        ),
        (
            "import os\ndef evaluate(r):\n    os.fork()\n    return True\n",
            Outcome::Refused,
            "os.fork",
        ),
        (
            "import os\ndef evaluate(r):\n    os.system('id')\n    return True\n",
            Outcome::Refused,
            "os.system",
        ),
        (
            "import sys\ndef evaluate(r):\n    sys.exit(3)\n",
            Outcome::Error,
            "",
        ),
        (
            "import os\ndef evaluate(r):\n    os._exit(3)\n",
            Outcome::Crashed,
            "status 3",
        ),
        (
            "import os\ndef evaluate(r):\n    os.kill(os.getppid(), 9)\n",
            Outcome::Refused,
            "os.kill",
        ),
        (
            "import os\ndef evaluate(r):\n    os.kill(os.getpid(), 9)\n",
            Outcome::Refused,
            "os.kill",
        ),
        (
            "import signal\ndef evaluate(r):\n    signal.raise_signal(signal.SIGKILL)\n",
            Outcome::Crashed,
            "signal 9",
        ),
        (
            "def evaluate(r):\n    return open('/etc/passwd').read()\n",
            Outcome::Refused,
            "read outside",
        ),
        (
            "import os\ndef evaluate(r):\n    return open('/proc/%d/environ' % os.getppid()).read()\n",
            Outcome::Refused,
            "read outside",
        ),
    ];
    let sources: Vec<&str> = cases.iter().map(|c| c.0).chain([GOOD]).collect();
    let results = run_all(&sources, vec![json!("abcd")]);
    for ((src, outcome, why), r) in cases.iter().zip(&results) {
        let c = only(r);
        assert_eq!(c.outcome, *outcome, "{src}: {c:?}");
        let reason = format!("{:?} {:?}", c.error, c.message);
        assert!(reason.contains(why), "{src}: reason {reason}");
    }
    let sys_exit = only(&results[7]);
    assert_eq!(sys_exit.error.as_deref(), Some("SystemExit"));
    let alloc = only(&results[2]);
    assert_eq!(alloc.error.as_deref(), Some("MemoryError"));
    // The pool still answers, after all of them.
    assert_eq!(only(results.last().unwrap()).value, Some(json!(true)));
    assert!(!std::path::Path::new("/tmp/ifloom-sandbox-escape").exists());
}

#[test]
fn output_environment_and_odd_values() {
    let sources = [
        // Megabytes to stdout and stderr go nowhere; the result still comes back.
        "import sys\ndef evaluate(r):\n    print('x' * 5_000_000)\n    sys.stderr.write('y' * 1_000_000)\n    return True\n",
        // The environment is empty: no PATH, HOME or keys of the ifloom process.
        "import os\ndef evaluate(r):\n    return ','.join(sorted(os.environ))\n",
        "def evaluate(r):\n    return [1, 2]\n",
        "def evaluate(r):\n    return 'True'\n",
        "def evaluate(r):\n    return 1\n",
        "def evaluate(r):\n    return None\n",
        // Writing inside its own scratch folder is allowed.
        "def evaluate(r):\n    open('note.txt', 'w').write(r)\n    return open('note.txt').read() == r\n",
        // Top-level helpers and `re` used without an import (upstream's script had it).
        "def helper(s):\n    return len(s)\ndef evaluate(r):\n    return helper(r) == 4 and bool(re.match('a', r))\n",
    ];
    let r = run_all(&sources, vec![json!("abcd")]);
    assert_eq!(only(&r[0]).value, Some(json!(true)));
    let env = only(&r[1]).value.clone().unwrap();
    let env = env.as_str().unwrap();
    assert!(!env.contains("PATH") && !env.contains("HOME"), "{env}");
    let list = only(&r[2]);
    assert_eq!(list.value, None);
    assert_eq!(list.repr.as_deref(), Some("[1, 2]"));
    assert_eq!(list.type_name.as_deref(), Some("list"));
    assert_eq!(list.as_int, None);
    let s = only(&r[3]);
    assert!(!s.eq_true && !s.equals_label(&json!(true)) && s.equals_label(&json!("True")));
    let one = only(&r[4]);
    assert!(one.equals_label(&json!(true)) && one.equals_label(&json!(1)));
    assert!(!one.equals_label(&json!("true")));
    let none = only(&r[5]);
    assert!(!none.equals_label(&Value::Null) && none.as_int.is_none());
    assert_eq!(only(&r[6]).value, Some(json!(true)));
    assert_eq!(only(&r[7]).value, Some(json!(true)));
}

#[test]
fn sources_that_do_not_compile_are_reported_not_called() {
    let r = run_all(
        &[
            "def evaluate(r)\n    return True\n",
            "x = 1\n",
            "import ctypes\ndef evaluate(r):\n    return True\n",
            "while True:\n    pass\n",
        ],
        vec![json!("abcd")],
    );
    assert!(!r[0].compile.ok);
    assert_eq!(r[0].compile.error.as_deref(), Some("SyntaxError"));
    assert!(r[1].compile.ok && !r[1].compile.has_evaluate);
    assert_eq!(r[2].compile.error.as_deref(), Some("SandboxViolation"));
    assert_eq!(r[3].compile.error.as_deref(), Some("Timeout"));
    for x in &r {
        assert!(x.calls[0].is_none());
    }
}

#[test]
fn a_crash_fails_only_its_call_the_next_inputs_still_run() {
    // Dies on "die", answers the others: the inputs after the crash get a fresh process.
    let src = "import os\ndef evaluate(r):\n    if r == 'die':\n        os._exit(1)\n    return r == 'yes'\n";
    let r = run_all(
        &[src],
        vec![json!("yes"), json!("die"), json!("no"), json!("yes")],
    );
    let outcomes: Vec<Outcome> = r[0]
        .calls
        .iter()
        .map(|c| c.as_ref().unwrap().outcome)
        .collect();
    assert_eq!(
        outcomes,
        [Outcome::Ok, Outcome::Crashed, Outcome::Ok, Outcome::Ok]
    );
    assert_eq!(r[0].calls[3].as_ref().unwrap().value, Some(json!(true)));
}

#[test]
fn the_network_is_a_namespace_of_its_own_where_the_kernel_allows() {
    let pool = Pool::new(&config()).unwrap();
    let jobs = [Job {
        source: GOOD.into(),
        inputs: vec![json!("abcd")],
    }];
    pool.run(&jobs, &|| false, &|_, _| Ok(())).unwrap();
    // `unshare -rn` works on this kind of machine; where it does not, the guard still
    // refuses sockets (the hostile test above).
    let can = std::process::Command::new("unshare")
        .args(["-rn", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if can {
        assert_eq!(pool.isolation(), Some(Isolation::Namespace));
    }
}

#[test]
fn results_are_cached_and_not_executed_again() {
    let dir = std::env::temp_dir().join(format!("ifloom-sbx-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = dir.join("python-cache.sqlite");
    let wanted = vec![
        (
            GOOD.to_string(),
            vec![json!("abcd"), json!("ab"), json!("abcd")],
        ),
        ("def evaluate(r)\n".to_string(), vec![json!("abcd")]),
    ];
    let (first, _) = execute(&config(), &cache, &wanted, &|| false, &|_| {}).unwrap();
    // Duplicated inputs run once; a source that does not compile runs nothing.
    assert_eq!((first.executed, first.from_cache), (2, 0));
    let (second, _) = execute(&config(), &cache, &wanted, &|| false, &|_| {}).unwrap();
    assert_eq!((second.executed, second.from_cache), (0, 3));
    assert_eq!(
        second.call(GOOD, &json!("ab")).unwrap().value,
        Some(json!(false))
    );
    assert!(!second.compiled["def evaluate(r)\n"].ok);
    // Another timeout is another experiment: nothing reused.
    let other = SandboxConfig {
        timeout_s: 2.0,
        ..config()
    };
    let (third, _) = execute(&other, &cache, &wanted, &|| false, &|_| {}).unwrap();
    assert_eq!(third.from_cache, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_interpreter_says_how_to_get_one() {
    let c = SandboxConfig {
        python: "python-that-does-not-exist".into(),
        ..SandboxConfig::default()
    };
    let problems = c.check();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].contains("not found on PATH")
            && problems[0].contains("apt-get install python3")
    );
}

/// The sandbox venv (`scripts/sandbox-venv.sh install`), if installed; a missing venv fails
/// under `IFLOOM_REQUIRE_SANDBOX_VENV` (CI sets it).
fn venv_config() -> Option<SandboxConfig> {
    if resolve_python(SANDBOX_VENV).is_err() {
        assert!(
            std::env::var_os("IFLOOM_REQUIRE_SANDBOX_VENV").is_none(),
            "IFLOOM_REQUIRE_SANDBOX_VENV is set but {} has no interpreter: run scripts/sandbox-venv.sh install",
            sandbox_venv_dir().display()
        );
        eprintln!("skipping: the sandbox venv is not installed (scripts/sandbox-venv.sh install)");
        return None;
    }
    Some(SandboxConfig {
        python: SANDBOX_VENV.into(),
        ..config()
    })
}

#[test]
fn the_venv_has_upstreams_nltk_and_np_and_reads_only_the_punkt_data() {
    let Some(cfg) = venv_config() else { return };
    let pool = Pool::new(&cfg).unwrap();
    let sources = [
        // Upstream's names, used without an import.
        "def evaluate(r):\n    return len(nltk.sent_tokenize(r))\n",
        "def evaluate(r):\n    return float(np.mean([len(w) for w in r.split()]))\n",
        // The Punkt files can be read ...
        "def evaluate(r):\n    d = str(nltk.data.find('tokenizers/punkt_tab/english'))\n    return len(open(d + '/abbrev_types.txt').read()) > 0\n",
        // ... not written ...
        "def evaluate(r):\n    d = str(nltk.data.find('tokenizers/punkt_tab/english'))\n    open(d + '/x.txt', 'w').write(r)\n    return True\n",
        // ... and nothing else of the nltk_data folder is visible.
        "import os\ndef evaluate(r):\n    d = str(nltk.data.find('tokenizers/punkt_tab'))\n    return os.listdir(os.path.dirname(os.path.dirname(d)))\n",
        "def evaluate(r):\n    return open('/etc/passwd').read()\n",
        // numpy holds a reference to ctypes; calling into native code is still refused.
        "def evaluate(r):\n    return np.ctypeslib.ctypes.CDLL(None)\n",
    ];
    let jobs: Vec<Job> = sources
        .iter()
        .map(|s| Job {
            source: s.to_string(),
            inputs: vec![json!("Hello Mr. Smith. How are you?")],
        })
        .collect();
    let out: Mutex<Vec<Option<JobResult>>> = Mutex::new(vec![None; jobs.len()]);
    pool.run(&jobs, &|| false, &|i, r| {
        out.lock().unwrap()[i] = Some(r.clone());
        Ok(())
    })
    .unwrap();
    let r: Vec<JobResult> = out.into_inner().unwrap().into_iter().flatten().collect();
    // Punkt: "Mr." is an abbreviation, so two sentences (nltk 3.9.2's English punkt_tab).
    assert_eq!(only(&r[0]).value, Some(json!(2)), "{:?}", only(&r[0]));
    // "Hello Mr. Smith. How are you?": (5 + 3 + 6 + 3 + 3 + 4) / 6 words.
    assert_eq!(only(&r[1]).value, Some(json!(4.0)));
    assert_eq!(only(&r[2]).value, Some(json!(true)), "{:?}", only(&r[2]));
    for (i, src) in sources.iter().enumerate().skip(3) {
        assert_eq!(
            only(&r[i]).outcome,
            Outcome::Refused,
            "{src}: {:?}",
            only(&r[i])
        );
    }
    let m = pool.modules().expect("a worker started");
    assert!(m.nltk.is_some() && m.numpy.is_some() && m.punkt, "{m:?}");
    assert_eq!(m.missing(), None);
}
