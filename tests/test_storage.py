"""Campaign results on object storage (issue 12), against a real S3 API on loopback: moto's
standalone server, started here as its own process (IAM authentication on, so credentials
are checked) and stopped by its PID. The storage probe and the jobs run on the session's two-node Ray
cluster on this machine (tests/cluster.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pyarrow_fs
import pytest
from cluster import BIN, free_port, processes_mentioning, stop, submit

import analysis
from campaign import cli
from campaign.runner import run_campaign
from campaign.spec import CampaignSpec
from trainables import storage

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "campaigns"
# 3 neuron sites x 2 bit specs = 6 tiny trials; record=all, so faults/ holds every fault
SPEC = dict(model="demo:vgg", weights="none", images=64, layers="0-2", sites=("neuron",), bits="random,30",
            record="all", report_every=32)
ARGS = ["--model", "demo:vgg", "--weights", "none", "--images", "64", "--layers", "0-2", "--sites", "neuron",
        "--bits", "random,30", "--record", "all", "--report-every", "32"]
TRIALS = 6
RUN_ONLY = ["wall_s", "device", "started_at", "worker"]  # differ between runs by nature


def frames(directory) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """trials.parquet, bits.parquet and faults/ of a campaign (local or on the store), without
    what differs between runs by nature."""
    read = lambda *parts: storage.read_table(storage.join(directory, *parts)).to_pandas()  # noqa: E731
    trials = read("trials.parquet").drop(columns=RUN_ONLY + ["campaign"])
    bits = read("bits.parquet").drop(columns=["campaign"])
    faults = pd.concat([read("faults", name) for name in storage.list_names(storage.join(directory, "faults"), ".parquet")])
    faults = faults.drop(columns=["campaign"]).sort_values(["trial_key", "image"]).reset_index(drop=True)
    return trials.reset_index(drop=True), bits.reset_index(drop=True), faults


def aws(s3: dict) -> dict:
    """The AWS_* variables of the s3 fixture."""
    return {k: v for k, v in s3.items() if k.startswith("AWS_")}


def assert_same_results(a, b) -> None:
    for x, y in zip(frames(a), frames(b)):
        pd.testing.assert_frame_equal(x, y)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with IAM authentication: an IAM user with S3 rights and
    the bucket are made by the first four (unauthenticated) requests; every later request
    must be signed with that user's key. Sets the AWS_* environment for this module."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              start_new_session=True)
    saved = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        session = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
        iam = session.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="campaigns")
        iam.put_user_policy(UserName="campaigns", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="campaigns")["AccessKey"]
        session.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)  # the 4th: authentication from here on
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield {**env, "log": log_path}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop([server])
        log.close()


@pytest.fixture(scope="module")
def reference(ray_address, tmp_path_factory):
    """The campaign on local disk."""
    outcome = run_campaign(CampaignSpec(**SPEC, out=str(tmp_path_factory.mktemp("local")), name="ref"))
    assert outcome.complete and outcome.finished == TRIALS
    return outcome.directory


@pytest.fixture(scope="module")
def resumed(s3, reference, two_nodes):
    """The campaign to s3://campaigns/runs/killed, submitted as a job to the two-node cluster,
    its driver SIGKILLed after 1 to 5 of its 6 trials, then finished by `resume
    s3://campaigns/runs/killed --address <the cluster>` from here, a driver that hands its
    AWS_* variables to the workers it starts."""
    uri = f"s3://{BUCKET}/runs/killed"
    first = submit(two_nodes, "run", *ARGS, "--max-concurrent", "1", "--out", f"s3://{BUCKET}/runs", "--name", "killed",
                   env_vars=aws(s3), wait=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done = storage.join(uri, "parts", "done")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not storage.list_names(done, ".json"):
        time.sleep(0.2)
    drivers = [pid for pid in processes_mentioning(f"s3://{BUCKET}/runs") if _is_driver(pid)]
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    killed_at = len(storage.list_names(done, ".json"))
    resume = subprocess.run([sys.executable, "-m", "campaign", "resume", uri, "--address", two_nodes["gcs"]], cwd=ROOT,
                            env={**two_nodes["env"], **aws(s3), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=600)
    return uri, killed_at, drivers, resume


def _is_driver(pid: int) -> bool:
    """A `python -m campaign run` process (the job's driver), not the shell around it."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(argv[0].decode()).name.startswith("python") and argv[1:4] == [b"-m", b"campaign", b"run"]


def test_resume_on_s3_after_sigkill_equals_a_local_disk_run(resumed, reference):
    """Through `ray job submit` on two nodes: the probe passes (a store is shared), the trials
    of both nodes land on the store, and the resumed campaign equals the local-disk run."""
    uri, killed_at, drivers, resume = resumed
    assert len(drivers) == 1 and 1 <= killed_at < TRIALS, (drivers, killed_at)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert f"[campaign] storage probe: all 2 nodes of the Ray cluster write {uri} and this driver reads it" in resume.stdout
    # a trial running when its driver died may still commit before Ray stops its worker: at most one more
    run_now = int(re.search(rf"\n{TRIALS}/{TRIALS} trials \((\d+) run now\)", resume.stdout).group(1))
    assert TRIALS - killed_at - 1 <= run_now <= TRIALS - killed_at, (killed_at, resume.stdout[-2000:])
    assert_same_results(reference, uri)
    assert storage.list_entries(uri) == ["bits.parquet", "faults", "parts", "ray", "spec.json", "trials.parquet"]


def test_analysis_and_report_read_the_campaign_on_s3(resumed, reference, tmp_path, capsys):
    uri = resumed[0]
    trials, local = analysis.load(uri), analysis.load(reference)
    assert trials["campaign_dir"].unique().tolist() == [uri] and trials["campaign"].unique().tolist() == ["killed"]
    drop = RUN_ONLY + ["campaign", "campaign_dir"]
    pd.testing.assert_frame_equal(trials.drop(columns=drop), local.drop(columns=drop))
    for load in (analysis.load_bits, analysis.load_faults):
        pd.testing.assert_frame_equal(load(uri).drop(columns=["campaign", "campaign_dir"]),
                                      load(reference).drop(columns=["campaign", "campaign_dir"]))
    assert cli.main(["report", uri, "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    row = local[(local["site_index"] == 2) & (local["bit_spec"] == "30")].iloc[0]
    assert f"Layer #2: {row['mismatches']} / {row['golden_correct']} = {100 * row['misclassification_rate']:.4f}%" in text
    assert "PARTIAL" not in text and f"  killed ({uri}):" in text
    assert (tmp_path / "report" / "per_site.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["report", uri]) == 2  # the report goes to a local folder: it must be named
    assert capsys.readouterr().err == f"error: {uri} is on object storage: pass --out with a local folder for the report\n"


@pytest.mark.parametrize("case", ["missing bucket", "unknown key", "wrong secret", "empty secret", "unreachable", "scheme",
                                  "slash"])
def test_a_store_that_cannot_be_used_gets_one_line_before_any_work(case, s3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a stray local folder named 's3:' would appear here
    out = {"missing bucket": "s3://no-such-bucket/runs", "scheme": "s4://campaigns/runs",
           "slash": "s3:/campaigns/runs"}.get(case, f"s3://{BUCKET}/refused")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        changes = {"unknown key": {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN0000000000"},
                   "wrong secret": {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                   "empty secret": {"AWS_SECRET_ACCESS_KEY": ""},
                   "unreachable": {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed.getsockname()[1]}"}}.get(case, {})
        for key, value in changes.items():
            monkeypatch.setenv(key, value)
        code = cli.main(["run", *ARGS, "--out", out, "--name", "c"])
    err = capsys.readouterr().err
    monkeypatch.undo()  # the module's AWS_* environment again, for the checks below
    expected = {
        "missing bucket": f"error: out: s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist at "
                          f"{s3['AWS_ENDPOINT_URL']}; create it, or choose another --out",
        "unknown key": f"error: out: s3://{BUCKET}/refused: the store at {s3['AWS_ENDPOINT_URL']} refused the credentials "
                       "(The AWS Access Key Id you provided does not exist in our records.); check AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)",
        "wrong secret": f"error: out: s3://{BUCKET}/refused: the store at {s3['AWS_ENDPOINT_URL']} refused the credentials "
                        "(The request signature we calculated does not match the signature you provided. Check your key "
                        "and signing method.); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)",
        "empty secret": f"error: out: cannot write to s3://{BUCKET}/refused (",
        "unreachable": f"error: out: s3://{BUCKET}/refused: cannot reach the object store at "
                       f"{changes.get('AWS_ENDPOINT_URL')} (Failed to connect to",
        "scheme": "error: out: 's4://campaigns/runs': unknown storage scheme 's4://'; use a local path or s3://",
        "slash": "error: out: 's3:/campaigns/runs' looks like a URI with a slash missing: write s3://campaigns/runs",
    }[case]
    assert code == 2 and err.count("\n") == 1 and err.startswith(expected), err
    assert list(tmp_path.iterdir()) == []  # nothing written locally
    assert storage.list_entries(f"s3://{BUCKET}/refused") == []  # nor on the store


def test_a_store_that_takes_the_probe_but_refuses_to_read_it_back_keeps_nothing(s3, monkeypatch):
    """Some stores accept a PUT with credentials they refuse for a HEAD (seen with an empty
    AWS_SECRET_ACCESS_KEY): the refusal is one line and the probe object is removed anyway."""
    def refused(loc):
        raise OSError(f"When reading information for key '{loc}': AWS Error ACCESS_DENIED during HeadObject operation: "
                      "No response body.")

    monkeypatch.setattr(storage, "read_bytes", refused)
    out = f"s3://{BUCKET}/read-refused"
    with pytest.raises(ValueError) as info:
        storage.check_location(out)
    assert str(info.value) == (f"{out}: the store at {s3['AWS_ENDPOINT_URL']} refused the credentials (access denied); "
                               "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)")
    assert storage.list_entries(out) == []


def test_resume_on_a_bucket_that_is_gone_says_so_in_one_line(s3, capsys):
    code = cli.main(["resume", "s3://no-such-bucket/c/x"])
    assert code == 2 and capsys.readouterr().err == (
        f"error: resume: s3://no-such-bucket/c/x: bucket 'no-such-bucket' does not exist at {s3['AWS_ENDPOINT_URL']}; "
        "check the location and AWS_ENDPOINT_URL\n")
    assert cli.main(["resume", f"s3://{BUCKET}/no/campaign"]) == 2  # the bucket exists: no campaign there
    assert capsys.readouterr().err == f"error: s3://{BUCKET}/no/campaign is not a campaign directory: no spec.json\n"


def test_the_probe_passes_a_shared_folder_and_refuses_one_local_to_each_node(two_nodes, tmp_path):
    """On one machine every folder is shared; the private hook PER_NODE_ROOT_ENV makes the
    second node write under a root of its own, as a node with its own disk would."""
    shared, own_disks = tmp_path / "shared", tmp_path / "node-disks"
    script = textwrap.dedent(f"""
        import os, ray
        from campaign import cli
        from campaign.probe import PER_NODE_ROOT_ENV, check_shared
        ray.init(address={two_nodes['gcs']!r}, logging_level="ERROR",
                 runtime_env={{"env_vars": {{"PYTHONPATH": {str(ROOT)!r}}}}})
        print("probed", check_shared({str(shared / 'c')!r}), "nodes", flush=True)
        os.environ[PER_NODE_ROOT_ENV] = {str(own_disks)!r}
        raise SystemExit(cli.main(["run", *{ARGS!r}, "--out", {str(shared)!r}, "--name", "c"]))
    """)
    env = {**two_nodes["env"], "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[campaign] storage probe: all 2 nodes of the Ray cluster write" in result.stdout
    assert "probed 2 nodes" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: out: {shared / 'c'} is not shared by the 2 nodes of the Ray cluster: node {two_nodes['worker_id']} "
        f"({two_nodes['worker_ip']}) wrote a probe file there that this driver (node {two_nodes['head_id']}) cannot read; use an "
        "object-store URI (--out s3://bucket/prefix) or a folder mounted on every node (NFS)"], result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # probes and the folders they made are gone, on both "disks"


def test_locations_name_uris_without_touching_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = storage.location("s3://bucket//runs/")
    assert uri == "s3://bucket/runs" and storage.join(uri, "c", "parts") == "s3://bucket/runs/c/parts"
    assert storage.name("s3://bucket/runs/c") == "c" and storage.parent("s3://bucket/runs/c") == "s3://bucket/runs"
    assert storage.join("s3://bucket/runs?region=eu-west-1", "c") == "s3://bucket/runs/c?region=eu-west-1"
    assert CampaignSpec(out="s3://bucket/runs", name="c").directory == "s3://bucket/runs/c"
    assert CampaignSpec(out="runs", name="c").directory == tmp_path / "runs" / "c"  # local: as before
    assert storage.location("file:///tmp/x") == Path("/tmp/x") and not storage.is_uri("file:///tmp/x")
    assert storage.environment("runs") == {}
    assert list(tmp_path.iterdir()) == []


def test_a_write_is_one_put_on_the_store(s3):
    target = f"s3://{BUCKET}/one-put/x.parquet"
    storage.write_bytes(target, b"x" * 100_000)
    assert storage.read_bytes(target) == b"x" * 100_000 and storage.file_size(target) == 100_000
    requests = [line for line in s3["log"].read_text().splitlines() if "/one-put/x.parquet" in line]
    puts = [line for line in requests if '"PUT /campaigns/one-put/x.parquet HTTP' in line]
    assert len(puts) == 1 and not any("uploads" in line for line in requests), requests  # no multipart upload
    storage.delete(target)
    assert not storage.exists(target)


def test_a_trial_commits_in_one_round_of_puts_and_reads_unfinished_until_all_landed(s3, monkeypatch):
    """On a store a trial's files and its marker are PUT at once, after its old marker and
    faults file were removed (begun when the trial started); a marker whose files did not
    all land lists digests they do not match, so the trial is not finished."""
    from trainables import results as R

    campaign = f"s3://{BUCKET}/one-round"
    row = {name: None for name in R.TRIAL_SCHEMA.names} | {"campaign": "one-round", "trial_key": "neuron-s0001-b30-seed1",
                                                          "images": 64, "mismatches": 3}
    bit_rows = [{name: 0 for name in R.BIT_SCHEMA.names} | {"campaign": "one-round", "trial_key": row["trial_key"],
                                                            "bit": 30, "images": 64}]
    log = s3["log"]
    before = len(log.read_text().splitlines())
    uncommitted = R.uncommit_trial(campaign, row["trial_key"])
    uncommitted.result()
    removals = log.read_text().splitlines()[before:]
    R.write_trial(campaign, row, bit_rows, None, uncommitted=uncommitted)
    writes = log.read_text().splitlines()[before + len(removals):]
    key = row["trial_key"]
    request = lambda line: tuple(re.search(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP', line).groups())  # noqa: E731
    assert [request(line) for line in removals] == [  # both missing (moto answers 404): nothing to delete
        ("HEAD", f"/{BUCKET}/one-round/parts/done/{key}.json"), ("HEAD", f"/{BUCKET}/one-round/faults/{key}.parquet")]
    assert sorted(request(line) for line in writes) == [
        ("PUT", f"/{BUCKET}/one-round/parts/{folder}/{key}.{ext}") for folder, ext in
        (("bits", "parquet"), ("done", "json"), ("trials", "parquet"))]
    assert R.check_trials(campaign).finished == {key}

    real = storage.write_bytes  # the same trial again, with other counts: its trial part fails to land
    monkeypatch.setattr(storage, "write_bytes", lambda loc, data: (_ for _ in ()).throw(OSError("connection reset"))
                        if "/parts/trials/" in str(loc) else real(loc, data))
    with pytest.raises(OSError, match="connection reset"):
        R.write_trial(campaign, row | {"mismatches": 5}, bit_rows, None, uncommitted=R.uncommit_trial(campaign, key))
    check = R.check_trials(campaign)
    assert check.finished == frozenset() and check.damaged == {key: f"parts/trials/{key}.parquet content differs "
                                                                    "from the committed SHA-256"}
    monkeypatch.setattr(storage, "write_bytes", real)
    R.write_trial(campaign, row | {"mismatches": 5}, bit_rows, None, uncommitted=R.uncommit_trial(campaign, key))
    assert R.check_trials(campaign).finished == {key}
    assert R.aggregate(campaign).column("mismatches").to_pylist() == [5]
    storage.delete_tree(campaign)


def test_tunes_view_of_the_store_skips_only_requests_that_can_only_miss(s3):
    """Tune's metrics-file lookups and folder markers cost no request; everything else
    reaches the store (campaign.tune_store)."""
    import pickle

    from campaign.tune_store import tune_view

    fs, root = storage.resolve(f"s3://{BUCKET}/tune-view")
    view = tune_view(fs)
    log = s3["log"]
    before = len(log.read_text().splitlines())
    infos = view.get_file_info([f"{root}/t1/result.json", f"{root}/t1/progress.csv"])
    view.create_dir(f"{root}/t1", recursive=True)
    assert [i.type for i in infos] == [pyarrow_fs.FileType.NotFound] * 2
    assert len(log.read_text().splitlines()) == before  # not one request
    with view.open_output_stream(f"{root}/t1/state.json") as out:
        out.write(b"{}")
    assert storage.read_bytes(f"s3://{BUCKET}/tune-view/t1/state.json") == b"{}"
    assert view.get_file_info(f"{root}/t1/state.json").size == 2
    assert [i.base_name for i in view.get_file_info(pyarrow_fs.FileSelector(f"{root}/t1"))] == ["state.json"]
    again = pickle.loads(pickle.dumps(view))  # Tune ships it to the trial actors
    assert again.get_file_info(f"{root}/t1/state.json").size == 2
    view.delete_dir(f"{root}/t1")
    assert storage.list_entries(f"s3://{BUCKET}/tune-view") == []


PROXY = textwrap.dedent("""
    import asyncio, sys
    listen, target = int(sys.argv[1]), int(sys.argv[2])

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())
""")

# the driver, with a test double: once `after` trials have completed, the store's endpoint (a
# TCP proxy in front of moto, so the stored objects survive for the resume) is SIGKILLed
OUTAGE_DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from campaign import cli, runner
    proxy, after, stamp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    real, done = runner.CommitChecks.on_trial_complete, []

    def on_trial_complete(self, *args, **kwargs):
        real(self, *args, **kwargs)
        done.append(1)
        if len(done) == after:
            os.kill(proxy, signal.SIGKILL)
            open(stamp, "w").write(repr(time.monotonic()))

    runner.CommitChecks.on_trial_complete = on_trial_complete
    code = cli.main(sys.argv[4:])
    open(stamp, "a").write(" " + repr(time.monotonic()))
    raise SystemExit(code)
""")


def _proxy(port: int, target: int) -> subprocess.Popen:
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, str(port), str(target)], stdout=subprocess.PIPE,
                             start_new_session=True)
    assert proxy.stdout.readline() == b"ready\n"
    return proxy


def test_the_store_killed_mid_campaign_stops_it_in_one_line_and_resume_loses_nothing(s3, reference, ray_address,
                                                                                      tmp_path):
    """The store's endpoint dies after 2 of 6 trials (one at a time): the trial that finds it
    gone fails, the driver's probes fail too, and the campaign stops: one line naming the
    store and the resume command, exit 75, no tracebacks. Once the endpoint is back, resume
    finishes it, equal to the local-disk run."""
    moto_port = int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **aws(s3), "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    uri = f"s3://{BUCKET}/runs/outage"
    stamp = tmp_path / "stamp"
    proxy = _proxy(port, moto_port)
    try:
        first = subprocess.run([sys.executable, "-c", OUTAGE_DRIVER, str(proxy.pid), "2", str(stamp), "run", *ARGS,
                                "--max-concurrent", "1", "--address", ray_address, "--out", f"s3://{BUCKET}/runs",
                                "--name", "outage"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        proxy.wait(timeout=30)
        killed_at, ended_at = map(float, stamp.read_text().split())
        print(f"stopped {ended_at - killed_at:.1f} s after the store's endpoint died; stderr: "
              f"{len(first.stderr.splitlines())} line(s), stdout: {len(first.stdout.splitlines())}")
        assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
        assert "Traceback" not in first.stdout + first.stderr, first.stderr[-3000:]
        lines = [line for line in first.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and re.fullmatch(
            rf"stopped: the object store at {re.escape(endpoint)} stopped answering \(.+\); once that is fixed, run "
            rf"`python -m campaign resume {re.escape(uri)}` to finish the campaign \(nothing committed is lost\)",
            lines[0]), first.stderr[-3000:]
        proxy = _proxy(port, moto_port)  # the store is back
        committed = len(storage.list_names(storage.join(uri, "parts", "done"), ".json"))
        assert 2 <= committed < TRIALS
        resume = subprocess.run([sys.executable, "-m", "campaign", "resume", uri, "--address", ray_address], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
        assert f"\n{TRIALS}/{TRIALS} trials ({TRIALS - committed} run now)" in resume.stdout
        assert_same_results(reference, uri)
    finally:
        stop([proxy])
