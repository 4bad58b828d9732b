"""Several replicas on one PostgreSQL database and one data directory (the README's "Several replicas").

A throwaway PostgreSQL server (Debian's ``postgresql`` package: initdb and pg_ctl) is started for
this module: data directory in a fresh temporary folder, listening on a free loopback port only,
its unix socket in that folder, trust authentication (nothing else can reach it). initdb refuses to
run as root, so as root it runs as the ``postgres`` OS user (``runuser``). Two service replicas
share its database (``postgresql+psycopg://``) and one data directory.

The module is skipped when no PostgreSQL binaries are installed, except under CI (``CI`` set), where
that is a failure: CI installs them (``apt-get install postgresql``), so a skip there would hide the
only test of PostgreSQL.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from service_helpers import KEY_B, Server, free_port, submit, wait_for

PG_USER = "postgres"  # the OS user initdb runs as when the tests run as root


def _missing(reason: str):
    """Skip locally; fail under CI, where PostgreSQL is installed on purpose."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip: "
                    "apt-get install postgresql, pip install -e '.[test]')", pytrace=False)
    pytest.skip(reason)


def _pg_bin() -> Path | None:
    """Directory with initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, else from PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
        return Path(initdb).parent
    return None


class PostgresServer:
    """initdb + pg_ctl in a temporary folder; `url` is the SQLAlchemy URL of database `bnfold`."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="bnfold-pg-"))  # not under pytest's tmp: that is root-only
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(PG_USER)
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.fail(f"running as root and there is no '{PG_USER}' OS user to run initdb as", pytrace=False)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", PG_USER, "--"]

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}")

    def start(self) -> PostgresServer:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "bnfold", "--auth=trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=bnfold dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE bnfold")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://bnfold@127.0.0.1:{self.port}/bnfold"


class Replica(Server):
    """A `Server` whose logs are named after the replica, so that replicas can share a data directory."""

    def __init__(self, name: str, data_dir: Path, env: dict[str, str]):
        self.name = name
        super().__init__(data_dir, env=env)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}-{self.starts}.log"

    @property
    def stdout_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}-{self.starts}.out"

    def all_log_lines(self) -> list[dict]:
        import json

        lines = []
        for start in range(1, self.starts + 1):
            path = self.data_dir.parent / f"{self.name}-{start}.log"
            lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return lines


@pytest.fixture(scope="module")
def postgres():
    bin_dir = _pg_bin()
    if bin_dir is None:
        _missing("PostgreSQL is not installed (no initdb/pg_ctl; Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (pip install -e '.[postgres]')")
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replicas(postgres, tmp_path_factory):
    """Replicas A and B: one database, one data directory, started at the same time (both create the schema)."""
    data = tmp_path_factory.mktemp("replicas") / "data"
    env = {"BNFOLD_DATABASE_URL": postgres.url, "BNFOLD_WORKERS": "2", "BNFOLD_MAX_WAIT": "30"}
    a, b = Replica("a", data, env), Replica("b", data, env)
    try:
        a.start(wait=False)
        b.start(wait=False)
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


def _rows(postgres: PostgresServer, job_ids: list[str]) -> dict[str, dict]:
    """The job rows as stored (what the API does not show: supervisor, attempts)."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=bnfold dbname=bnfold", row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM jobs WHERE id = ANY(%s)", (job_ids,)).fetchall()
    return {row["id"]: row for row in rows}


def _starts(replicas, job_ids) -> dict[str, int]:
    """How many times each job's process was started, over every replica's logs."""
    counts = dict.fromkeys(job_ids, 0)
    for replica in replicas:
        for line in replica.all_log_lines():
            if line.get("job_id") in counts and "job started" in str(line.get("message", line.get("msg", ""))):
                counts[line["job_id"]] += 1
    return counts


def test_job_from_one_replica_is_visible_and_downloadable_from_the_other(replicas):
    a, b = replicas
    with a.client() as ca, b.client() as cb, b.client(KEY_B) as other:
        response = submit(ca, wait=30)
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["state"] == "succeeded"
        seen = cb.get(f"/v1/jobs/{job['id']}")
        assert seen.status_code == 200 and seen.json()["state"] == "succeeded"
        assert seen.json()["attempts"] == 1
        assert other.get(f"/v1/jobs/{job['id']}").status_code == 404  # still one key's job, on every replica
        from_a, from_b = ca.get(f"/v1/jobs/{job['id']}/model"), cb.get(f"/v1/jobs/{job['id']}/model")
        assert from_a.status_code == from_b.status_code == 200
        assert from_a.content == from_b.content and from_a.headers["etag"] == from_b.headers["etag"]
        assert cb.get(f"/v1/jobs/{job['id']}/report").json() == ca.get(f"/v1/jobs/{job['id']}/report").json()
        assert job["id"] in [item["id"] for item in cb.get("/v1/jobs", params={"limit": 100}).json()["items"]]


def test_concurrent_jobs_across_replicas_run_exactly_once(replicas, postgres):
    a, b = replicas
    clients = [a.client(), b.client()]
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: submit(clients[i % 2], options={"batch_size": 4 + i % 3}), range(12)))
        assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
        job_ids = [r.json()["id"] for r in responses]
        for i, job_id in enumerate(job_ids):  # each job, polled through the replica it was not sent to
            assert wait_for(clients[(i + 1) % 2], job_id, timeout=90)["state"] == "succeeded"
    finally:
        for client in clients:
            client.close()
    rows = _rows(postgres, job_ids)
    assert sorted(rows) == sorted(job_ids)
    for job_id, row in rows.items():
        assert row["state"] == "succeeded" and row["attempts"] == 1, (job_id, row["state"], row["attempts"])
        assert row["supervisor_id"] and row["result_sha256"]
    time.sleep(0.3)  # the last log lines
    assert _starts(replicas, job_ids) == dict.fromkeys(job_ids, 1)


def test_restarted_replica_still_serves_finished_jobs(replicas):
    a, b = replicas
    with a.client() as ca:
        ids = [submit(ca, wait=30).json()["id"] for _ in range(2)]
        models = {job_id: ca.get(f"/v1/jobs/{job_id}/model").content for job_id in ids}
    a.stop()
    with b.client() as cb:  # the other replica goes on while A is down
        assert all(cb.get(f"/v1/jobs/{job_id}/model").content == models[job_id] for job_id in ids)
        queued_meanwhile = submit(cb, wait=30).json()
    a.start()
    with a.client() as ca:
        for job_id in [*ids, queued_meanwhile["id"]]:
            job = ca.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "succeeded" and job["attempts"] == 1
            assert ca.get(f"/v1/jobs/{job_id}/model").status_code == 200
        for job_id in ids:
            assert ca.get(f"/v1/jobs/{job_id}/model").content == models[job_id]
        assert submit(ca, wait=30).json()["state"] == "succeeded"  # and runs new jobs on the same database


def test_replicas_starting_together_create_the_schema_once(postgres):
    """Without the schema lock, processes creating the tables at the same instant fail now and then
    with DuplicateTable (a few rounds of six make that all but certain); with it every one succeeds."""
    import sys

    import psycopg

    admin = f"host=127.0.0.1 port={postgres.port} user=bnfold dbname=postgres"
    url = postgres.url.rsplit("/", 1)[0] + "/schema_race"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    for _ in range(4):
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS schema_race")
            conn.execute("CREATE DATABASE schema_race")
        at = time.time() + 1.0  # every process past its imports, then all at once
        code = f"import time; from service.db import make_engine; time.sleep(max(0, {at} - time.time())); make_engine({url!r})"
        processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
                     for _ in range(6)]
        errors = [p.communicate(timeout=60)[1] for p in processes]
        assert [p.returncode for p in processes] == [0] * 6, "\n".join(e[-1500:] for e in errors if e)
