package nbd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandem-storage/tandem/dataplane/nbd/nbdtest"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// These tests drive the server with real NBD clients (Debian packages
// qemu-utils, libnbd-bin and fio). A missing client skips its test unless
// TANDEM_REQUIRE_NBD_CLIENTS=1.

const interopTimeout = 60 * time.Second

const refusal = "member node-b is the backup, not the writer (epoch 3)"

// startInterop serves a MemBackend of size bytes as testExport, a read-only
// export "ns/ro" and a refused export "ns/backup".
func startInterop(t *testing.T, size int64) *testEnv {
	t.Helper()
	return startServer(t, size, func(_ *Server, e *StaticExports) {
		e.Add("ns/ro", &Export{Backend: NewMemBackend(1 << 20), ReadOnly: true})
		e.Refuse("ns/backup", errors.New(refusal))
	})
}

func (e *testEnv) uri(export string) string { return "nbd://" + e.addr + "/" + export }

// runClient runs an NBD client and returns its combined output. wantOK says
// whether a zero exit status is expected.
func runClient(t *testing.T, wantOK bool, name string, args ...string) string {
	t.Helper()
	return runClientEnv(t, nil, wantOK, name, args...)
}

// runClientEnv is runClient with extra environment variables.
func runClientEnv(t *testing.T, env []string, wantOK bool, name string, args ...string) string {
	t.Helper()
	path := nbdtest.Require(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = t.TempDir() // fio leaves verify state files behind
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s %q timed out; output:\n%s", name, args, out)
	}
	if wantOK && err != nil {
		t.Fatalf("%s %q: %v; output:\n%s", name, args, err, out)
	}
	if !wantOK && err == nil {
		t.Fatalf("%s %q succeeded, want failure; output:\n%s", name, args, out)
	}
	return string(out)
}

func TestInteropNbdinfo(t *testing.T) {
	nbdtest.Require(t, "nbdinfo")
	env := startInterop(t, 16<<20)
	var info struct {
		Protocol string `json:"protocol"`
		Exports  []struct {
			Name         string `json:"export-name"`
			Description  string `json:"description"`
			Size         int64  `json:"export-size"`
			ReadOnly     bool   `json:"is_read_only"`
			CanFlush     bool   `json:"can_flush"`
			CanFUA       bool   `json:"can_fua"`
			CanTrim      bool   `json:"can_trim"`
			CanZero      bool   `json:"can_zero"`
			CanMultiConn bool   `json:"can_multi_conn"`
			MinBlock     uint32 `json:"block_size_minimum"`
			PrefBlock    uint32 `json:"block_size_preferred"`
			MaxBlock     uint32 `json:"block_size_maximum"`
		} `json:"exports"`
	}
	out := runClient(t, true, "nbdinfo", "--json", env.uri(testExport))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	e := info.Exports[0]
	if info.Protocol != "newstyle-fixed" || e.Name != testExport || e.Description != "test volume" || e.Size != 16<<20 ||
		e.ReadOnly || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanMultiConn ||
		e.MinBlock != 1 || e.PrefBlock != 4096 || e.MaxBlock != 32<<20 {
		t.Fatalf("nbdinfo reports %+v (%s)", e, out)
	}

	out = runClient(t, true, "nbdinfo", "--json", env.uri("ns/ro"))
	if !strings.Contains(out, `"is_read_only": true`) {
		t.Fatalf("read-only export not reported read-only:\n%s", out)
	}

	out = runClient(t, true, "nbdinfo", "--list", "nbd://"+env.addr)
	for _, name := range []string{`export="ns/vol"`, `export="ns/ro"`} {
		if !strings.Contains(out, name) {
			t.Fatalf("nbdinfo --list lacks %s:\n%s", name, out)
		}
	}

	// libnbd shows the server's message in its debug output only.
	out = runClientEnv(t, []string{"LIBNBD_DEBUG=1"}, false, "nbdinfo", env.uri("ns/backup"))
	if !strings.Contains(out, refusal) {
		t.Fatalf("refusal reason not shown by nbdinfo:\n%s", out)
	}
}

func TestInteropQemuIO(t *testing.T) {
	nbdtest.Require(t, "qemu-io")
	env := startInterop(t, 16<<20)
	cmds := []string{
		"write -P 0xab 0 64k",
		"read -P 0xab 0 64k",
		"write -f -P 0xac 64k 64k", // FUA
		"aio_write -P 0xc1 1M 64k",
		"aio_write -P 0xc2 2M 1M",
		"aio_write -P 0xc3 4M 4k",
		"aio_flush",
		"flush",
		"read -P 0xc1 1M 64k",
		"read -P 0xc2 2M 1M",
		"write -z 2M 64k",
		"read -P 0 2M 64k",
		"read -P 0xc2 2112k 960k",
		"discard 4M 4k",
		"write -P 0x5a 8M 3M", // several requests are needed if the client splits
		"read -P 0x5a 8M 3M",
		"writev -P 0x77 12M 4k 8k 512",
		"readv -P 0x77 12M 4k 8k 512",
	}
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := runClient(t, true, "qemu-io", append(args, env.uri(testExport))...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	b := env.mem.Bytes()
	for _, chk := range []struct {
		off, n int
		v      byte
	}{{0, 64 << 10, 0xab}, {64 << 10, 64 << 10, 0xac}, {1 << 20, 64 << 10, 0xc1}, {2 << 20, 64 << 10, 0}, {2<<20 + 64<<10, 960 << 10, 0xc2}, {8 << 20, 3 << 20, 0x5a}} {
		assertBytes(t, fmt.Sprintf("backend at %d", chk.off), b[chk.off:chk.off+chk.n], bytes.Repeat([]byte{chk.v}, chk.n))
	}
	st := env.srv.Stats()
	if st.Flush.Requests < 2 || st.WriteZeroes.Requests == 0 || st.Trim.Requests == 0 || env.mem.FUAWrites() == 0 {
		t.Fatalf("qemu-io did not exercise flush, zero, trim and FUA: %+v, FUA writes %d", st, env.mem.FUAWrites())
	}

	// Read-only export: writes fail with EPERM, reads work.
	out = runClient(t, false, "qemu-io", "-f", "raw", "-c", "write 0 4k", env.uri("ns/ro"))
	if !strings.Contains(out, "Operation not permitted") && !strings.Contains(out, "read-only") && !strings.Contains(out, "Permission denied") {
		t.Fatalf("write to read-only export:\n%s", out)
	}
	runClient(t, true, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4k", env.uri("ns/ro"))

	// The refusal reason reaches qemu's error message.
	out = runClient(t, false, "qemu-io", "-f", "raw", "-c", "read 0 512", env.uri("ns/backup"))
	if !strings.Contains(out, refusal) {
		t.Fatalf("refusal reason not shown by qemu-io:\n%s", out)
	}
}

// randomFile writes n random bytes to a temp file and returns its path and
// contents.
func randomFile(t *testing.T, n int, seed uint64) (string, []byte) {
	t.Helper()
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, seed+1))
	for i := 0; i+8 <= n; i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	// Leave zero runs so clients may use zeroing or sparse writes.
	clear(b[n/4 : n/4+1<<20])
	p := filepath.Join(t.TempDir(), fmt.Sprintf("data-%d.img", seed))
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, b
}

func TestInteropNbdcopy(t *testing.T) {
	nbdtest.Require(t, "nbdcopy")
	const size = 16 << 20
	env := startInterop(t, size)
	src, data := randomFile(t, size, 1)
	// nbdcopy uses several connections (CAN_MULTI_CONN) and many requests
	// in flight.
	runClient(t, true, "nbdcopy", "--flush", "--requests=32", src, env.uri(testExport))
	if sha256.Sum256(env.mem.Bytes()) != sha256.Sum256(data) {
		t.Fatal("backend differs from the copied file")
	}
	if sha256.Sum256(env.mem.Durable()) != sha256.Sum256(data) {
		t.Fatal("nbdcopy --flush did not make the copy durable")
	}
	dst := filepath.Join(t.TempDir(), "out.img")
	runClient(t, true, "nbdcopy", env.uri(testExport), dst)
	if testkit.FileSHA256(t, dst) != testkit.SHA256(data) {
		t.Fatal("copied-out file differs")
	}
	if env.srv.Stats().ConnsTotal < 2 {
		t.Fatalf("expected several connections: %+v", env.srv.Stats())
	}
}

func TestInteropQemuImg(t *testing.T) {
	nbdtest.Require(t, "qemu-img")
	const size = 16 << 20
	env := startInterop(t, size)
	src, data := randomFile(t, size, 2)
	runClient(t, true, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", "-m", "8", src, env.uri(testExport))
	if sha256.Sum256(env.mem.Bytes()) != sha256.Sum256(data) {
		t.Fatal("backend differs after qemu-img convert")
	}
	runClient(t, true, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, env.uri(testExport))
	// Change one byte behind qemu's back: compare must notice.
	c := connect(t, env.addr, testExport)
	if e := c.writeAt(size/2, []byte{^data[size/2]}, 0); e != 0 {
		t.Fatal(e)
	}
	out := runClient(t, false, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, env.uri(testExport))
	if !strings.Contains(out, "Content mismatch") {
		t.Fatalf("qemu-img compare:\n%s", out)
	}
	out = runClient(t, true, "qemu-img", "info", "-f", "raw", env.uri(testExport))
	if !strings.Contains(out, "16 MiB") {
		t.Fatalf("qemu-img info:\n%s", out)
	}
}

func TestInteropFio(t *testing.T) {
	nbdtest.Require(t, "fio")
	env := startInterop(t, 32<<20)
	out := runClient(t, true, "fio",
		"--name=randwrite-verify", "--ioengine=nbd", "--uri="+env.uri(testExport),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=8m", "--runtime=20",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse")
	if strings.Contains(out, "verify:") || strings.Contains(out, "bad magic") {
		t.Fatalf("fio reported verify errors:\n%s", out)
	}
	st := env.srv.Stats()
	if st.Write.Requests < 2048 || st.Read.Requests < 2048 {
		t.Fatalf("fio did not write and verify 8 MiB in 4 KiB blocks: %+v\n%s", st, out)
	}
	out = runClient(t, true, "fio",
		"--name=seqwrite", "--ioengine=nbd", "--uri="+env.uri(testExport),
		"--rw=write", "--bs=1m", "--iodepth=8", "--size=16m", "--runtime=20",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse")
	if now := env.srv.Stats(); now.Write.Bytes < st.Write.Bytes+16<<20 || now.Read.Bytes < st.Read.Bytes+16<<20 {
		t.Fatalf("fio did not write and verify 16 MiB in 1 MiB blocks: %+v\n%s", now, out)
	}
}
