"""TLS for ``--cluster``, and the rule that keeps a plain tcp:// driver on loopback.

No test here sends a packet off this machine, even when the code under test is wrong: the TLS cluster is a
scheduler and a worker started on 127.0.0.1 with the commands README shows (``dask scheduler`` / ``dask worker``
with ``--tls-ca-file/--tls-cert/--tls-key``), its credentials made by ``Security.temporary()`` and written to the
test's folder (as is everything the cluster writes: TMPDIR points there). The address rule is tested on strings,
and through the command line with Dask's Client replaced by a stub, under :func:`loopback_only`, which fails the
test on any connection or name lookup off loopback before it is made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from comfy_harness import REPO, find_comfyui
from PIL import Image

pytest.importorskip("distributed")
pytest.importorskip("cryptography")  # Security.temporary()

from test_cluster import (  # noqa: E402
    WORKFLOW,
    bare_cluster,  # noqa: F401  (fixture)
    driver_cmd,
    journal_lines,
    leftovers,
    outputs,
    stop,
    tiny_models,  # noqa: F401  (fixture)
)

from lcm_tools import cli  # noqa: E402
from lcm_tools.cluster_security import check_cluster_address, is_safe_cluster_address, split_address  # noqa: E402
from lcm_tools.cluster_spec import ClusterError, ServerSpec  # noqa: E402

TEN = "tcp://10.1.2.3:8786"


# ------------------------------------------------------------------------------------------ helpers


def _literally_loopback(host) -> bool:
    """The guard's own test (not the code under test's): None, localhost, or a loopback IP literal."""
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch):
    """Every connect and name lookup this process makes off loopback fails the test before it happens (a failure
    the code under test cannot catch as an OSError), and is listed again at the end in case it was swallowed."""
    tried: list = []

    def refuse(what, host):
        tried.append((what, host))
        pytest.fail(f"the test tried to reach {host!r} ({what}): only loopback is allowed here")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create, real_getaddrinfo = socket.create_connection, socket.getaddrinfo

    def host_of(address):
        return address[0] if isinstance(address, tuple) else None  # a str is an AF_UNIX path: local

    def connect(self, address):
        if not _literally_loopback(host_of(address)):
            refuse("connect", host_of(address))
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _literally_loopback(host_of(address)):
            refuse("connect_ex", host_of(address))
        return real_connect_ex(self, address)

    def create_connection(address, *args, **kwargs):
        if not _literally_loopback(address[0]):
            refuse("create_connection", address[0])
        return real_create(address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        if not _literally_loopback(host):
            refuse("getaddrinfo", host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert tried == [], f"off-loopback attempts: {tried}"


@pytest.fixture
def client_stub(monkeypatch):
    """Dask's Client replaced: ``forbid()`` makes any call fail the test; otherwise each call is recorded and
    answered as an unreachable scheduler would be (OSError)."""
    import distributed

    stub = SimpleNamespace(calls=[], forbidden=False)

    class Client:
        def __init__(self, *args, **kwargs):
            stub.calls.append((args, kwargs))
            if stub.forbidden:
                pytest.fail(f"Dask's Client was called with {args} {kwargs}: the driver should have refused first")
            raise OSError("stub: no scheduler here")

    stub.forbid = lambda: setattr(stub, "forbidden", True)
    monkeypatch.setattr(distributed, "Client", Client)
    return stub


def write_credentials(folder: Path) -> dict[str, Path]:
    """A fresh key and self-signed certificate (``Security.temporary()``) as PEM files in ``folder``. The certificate
    is its own CA, and every role (scheduler, worker, driver) presents it: the simplest cluster README's steps make."""
    from distributed.security import Security

    temporary = Security.temporary()
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    files["ca"].write_text(temporary.tls_ca_file)
    files["cert"].write_text(temporary.tls_client_cert)
    files["key"].write_text(temporary.tls_client_key)
    files["key"].chmod(0o600)
    return files


def tls_flags(files: dict[str, Path]) -> list[str]:
    return ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]


def security_of(files: dict[str, Path], ca: Path | None = None):
    """The Security a driver presenting ``files`` uses; ``ca``: trust another CA than the one in ``files``."""
    from distributed.security import Security

    return Security(require_encryption=True, tls_ca_file=str(ca or files["ca"]), tls_client_cert=str(files["cert"]),
                    tls_client_key=str(files["key"]))


def cli_run(tmp_path: Path, *flags: str) -> tuple[int, Path]:
    """``python -m lcm_tools run`` in this process, on a one-line prompts file; (exit code, the --output folder)."""
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a cat\n")
    return cli.main(["run", WORKFLOW, "--prompts", str(prompts), "--output", str(out), "--quiet", *flags]), out


# ------------------------------------------------------------------------------------------ the address rule, on strings


@pytest.mark.parametrize("address, safe", [
    (TEN, False),
    ("tcp://example.org:8786", False),  # a name is another host: it is never looked up (loopback_only would fail)
    ("tcp://127.0.0.1.example.org:8786", False),
    ("10.1.2.3:8786", False),  # no scheme: Dask's default, tcp
    ("tcp://0.0.0.0:8786", False),
    ("ws://10.1.2.3:8786", False),
    ("tcp://[2001:db8::1]:8786", False),
    ("tcp://[::1]:8786", True),
    ("tcp://127.0.0.1:8786", True),
    ("tcp://127.4.5.6:8786", True),
    ("tcp://localhost:8786", True),
    ("tcp://[::ffff:127.0.0.1]:8786", True),
    ("tls://10.1.2.3:8786", True),
    ("tls://example.org:8786", True),
    ("tls://[2001:db8::1]:8786", True),
])
def test_plain_tcp_is_allowed_only_to_loopback(address, safe, loopback_only):
    assert is_safe_cluster_address(address) is safe


def test_the_refusal_names_the_risk_and_the_fix_in_one_sentence(loopback_only):
    assert split_address("tcp://[::1]:8786") == ("tcp", "::1") and split_address("example.org:1") == ("tcp", "example.org")
    with pytest.raises(ClusterError) as info:
        check_cluster_address(TEN)
    text = str(info.value)
    assert text.count(". ") == 0 and "\n" not in text  # one sentence
    assert "Dask unpickles what it is sent, so anyone who can reach that port can run code on every host" in text
    assert "--cluster tls://10.1.2.3:8786 with --tls-ca-file, --tls-cert and --tls-key" in text and "--insecure-cluster" in text
    check_cluster_address(TEN, insecure=True)  # the user's explicit choice
    check_cluster_address("tcp://127.0.0.1:8786")


# ------------------------------------------------------------------------------------------ the rule, through the command line


@pytest.mark.parametrize("address", [TEN, "tcp://example.org:8786"])
def test_the_cli_refuses_plain_tcp_to_another_host_before_connecting(address, tmp_path, capsys, loopback_only, client_stub):
    client_stub.forbid()
    code, out = cli_run(tmp_path, "--cluster", address)
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"error: --cluster {address} is unencrypted tcp to another host" in err
    assert "anyone who can reach that port can run code on every host of the cluster" in err and "--insecure-cluster" in err
    assert client_stub.calls == [] and not out.exists()


def test_tls_without_credentials_is_refused_before_connecting(tmp_path, capsys, loopback_only, client_stub):
    import dask

    client_stub.forbid()
    no_tls = {"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None, "distributed.comm.tls.client.key": None}
    with dask.config.set(no_tls):
        code, out = cli_run(tmp_path, "--cluster", "tls://10.1.2.3:8786")
    err = capsys.readouterr().err
    assert code == 1 and "--cluster tls://10.1.2.3:8786 needs this driver's TLS credentials: give --tls-ca-file" in err, err
    assert client_stub.calls == [] and not out.exists()


def test_tls_flags_that_cannot_work_are_refused(tmp_path, capsys, loopback_only, client_stub):
    client_stub.forbid()
    files = write_credentials(tmp_path / "creds")
    cases = [
        (["--cluster", "tcp://127.0.0.1:8786", *tls_flags(files)], "are for a TLS scheduler, but --cluster tcp://127.0.0.1:8786 is tcp"),
        (["--workers", "1", "--tls-cert", str(files["cert"])], "--workers needs none"),
        (["--cluster", "tls://10.1.2.3:8786", "--tls-cert", str(files["cert"])], "TLS needs both --tls-ca-file"),
        (["--cluster", "tls://10.1.2.3:8786", "--tls-ca-file", str(files["ca"]), "--tls-cert", str(tmp_path / "nope.pem")],
         f"--tls-cert {tmp_path / 'nope.pem'} does not exist"),
    ]
    for flags, message in cases:
        code, out = cli_run(tmp_path, *flags)
        err = capsys.readouterr().err
        assert code == 1 and message in err, (flags, err)
        assert not out.exists()
    assert client_stub.calls == []


def test_insecure_cluster_lets_plain_tcp_through(tmp_path, capsys, loopback_only, client_stub):
    code, _ = cli_run(tmp_path, "--cluster", TEN, "--insecure-cluster")
    err = capsys.readouterr().err
    assert code == 1 and f"cannot reach a Dask scheduler at {TEN} (stub: no scheduler here)" in err, err
    [(args, kwargs)] = client_stub.calls
    assert args == (TEN,) and kwargs["security"] is None  # Dask's own configuration applies, as for any Client


def test_tls_flags_give_the_client_a_security_that_requires_encryption(tmp_path, capsys, loopback_only, client_stub):
    files = write_credentials(tmp_path / "creds")
    code, _ = cli_run(tmp_path, "--cluster", "tls://10.1.2.3:8786", *tls_flags(files))
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach a Dask scheduler at tls://10.1.2.3:8786" in err and "over TLS" in err, err
    [(args, kwargs)] = client_stub.calls
    security = kwargs["security"]
    assert args == ("tls://10.1.2.3:8786",) and security.require_encryption is True
    assert (security.tls_ca_file, security.tls_client_cert, security.tls_client_key) == (
        str(files["ca"]), str(files["cert"]), str(files["key"]))


@pytest.fixture
def dask_scratch_in_tmp(tmp_path):
    """Dask's scratch space (its lock files) in the test's folder, not the system's temporary folder."""
    import dask

    with dask.config.set({"temporary-directory": str(tmp_path / "dask-scratch")}):
        yield


def test_a_loopback_tcp_scheduler_is_still_joined(dask_scratch_in_tmp, bare_cluster, tmp_path, capsys, loopback_only):  # noqa: F811
    """A real Client, in this process, to a scheduler on tcp://127.0.0.1 (no workers: the job stops at that check,
    which it reaches only after joining)."""
    cluster, _ = bare_cluster
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    code, out = cli_run(tmp_path, "--cluster", cluster.scheduler_address)
    err = capsys.readouterr().err
    assert code == 1 and "error: the cluster has no workers" in err, err
    assert out.is_dir()  # the job started


# ------------------------------------------------------------------------------------------ a TLS cluster on 127.0.0.1


def dask_process(*args: str, folder: Path, env: dict, log: str) -> subprocess.Popen:
    with open(folder / log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def tls_cluster(tiny_models, tmp_path_factory):  # noqa: F811
    """A scheduler and one worker (2 threads), started as README shows with TLS, on 127.0.0.1; a Client with the
    credentials is connected. Everything they write (Dask's scratch space, the worker's ComfyUI slot) is in the
    test's folder."""
    from distributed import Client

    comfy_path, why = find_comfyui()
    assert comfy_path is not None, why
    folder = tmp_path_factory.mktemp("tls-cluster")
    (folder / "tmp").mkdir()
    files = write_credentials(folder / "credentials")
    env = {**os.environ, "TMPDIR": str(folder / "tmp"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    info = folder / "scheduler.json"
    procs = []
    try:
        procs.append(dask_process("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol", "tls",
                                  "--no-dashboard", "--scheduler-file", str(info), *tls_flags(files), folder=folder, env=env,
                                  log="scheduler.log"))
        deadline = time.monotonic() + 120
        while not info.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert info.is_file(), (folder / "scheduler.log").read_text()
        time.sleep(0.2)  # the file is written whole, but give the writer its flush
        address = json.loads(info.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:"), address
        procs.append(dask_process("distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--nthreads", "2", "--name", "tls0",
                                  "--no-dashboard", "--local-directory", str(folder / "worker"), *tls_flags(files), folder=folder,
                                  env=env, log="worker.log"))
        spec = ServerSpec(comfy_path=str(Path(comfy_path).resolve()), base_directory=str(tiny_models.resolve()),
                          extra_args=("--disable-api-nodes",))
        with Client(address, security=security_of(files), timeout="60s") as client:
            client.wait_for_workers(1, timeout=120)
            yield SimpleNamespace(address=address, files=files, env=env, spec=spec, client=client, folder=folder)
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_a_prompts_file_runs_exactly_once_over_tls(tls_cluster, tmp_path):
    """`python -m lcm_tools run ... --cluster tls://127.0.0.1:PORT --tls-ca-file --tls-cert --tls-key`, the real command:
    every prompt is written once under its own name, by the TLS worker; its ComfyUI is released at the end."""
    c = tls_cluster
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a lighthouse at dusk\n" + "".join(json.dumps({"id": f"tls-{i}", "seed": 40 + i}) + "\n" for i in range(3)))
    expected = ["line000001_s0_00.png", "tls-0_s40_00.png", "tls-1_s41_00.png", "tls-2_s42_00.png"]
    r = subprocess.run(driver_cmd(c.address, c.spec, prompts, out) + [*tls_flags(c.files), "--quiet", "--release-servers"],
                       cwd=REPO, env=c.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 done, 0 failed, 0 skipped (already done), of 4 prompts" in r.stdout, r.stdout
    assert outputs(out) == expected and leftovers(out) == []
    entries = journal_lines(out)
    assert sorted(e["stem"] for e in entries) == sorted(n.removesuffix("_00.png") for n in expected)  # one entry per prompt
    assert {e["worker"] for e in entries} == {"tls0"} and all(e["address"].startswith("tls://127.0.0.1:") for e in entries)
    for name in expected:
        img = Image.open(out / name)
        assert img.size == (16, 16) and any(lo != hi for lo, hi in img.getextrema())
    assert len({(out / name).read_bytes() for name in expected[1:]}) == 3  # three seeds, three pictures


def test_the_tls_scheduler_refuses_clients_without_its_credentials(tls_cluster, tmp_path, loopback_only):
    from distributed import Client

    c = tls_cluster
    known = c.client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.clients))
    # a certificate the cluster's CA did not sign (the client trusts the scheduler: it is the scheduler that refuses)
    stranger = write_credentials(tmp_path / "stranger")
    # the scheduler's TLS alert (its CA does not know that certificate), or its hang-up when that alert loses the race
    with pytest.raises(OSError, match=r"alert unknown ca|SSLEOFError"):
        Client(c.address, security=security_of(stranger, ca=c.files["ca"]), timeout="3s")
    # plain Dask, no TLS at all, to the same port
    with pytest.raises(OSError):
        Client(c.address.replace("tls://", "tcp://", 1), timeout="3s")
    # TLS that trusts the scheduler but presents no certificate: the scheduler ends the handshake
    host, port = c.address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(c.files["ca"]))
    ctx.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        try:
            got = tls.recv(1)  # a scheduler that let it in would wait for Dask's handshake: a timeout fails the test
        except (ssl.SSLError, ConnectionResetError) as exc:  # its alert (certificate required), or its hang-up
            got = exc
    assert got == b"" or isinstance(got, (ssl.SSLError, ConnectionResetError)), got
    assert c.client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.clients)) == known  # none got in
    assert list(c.client.scheduler_info()["workers"]) and c.client.scheduler.address == c.address  # with credentials: in
