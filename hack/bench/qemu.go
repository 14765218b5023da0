package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
)

// The real peer: qemu-storage-daemon serves a raw file over NBD and mirrors
// every write to an nbdkit file plugin on the other "node" with a
// blockdev-mirror job. copy-mode=write-blocking completes a write only once
// the target has it too (the peer of a Sync pair); background marks a dirty
// bitmap the job copies from (the peer of an Async pair). Its target
// acknowledges from the page cache.
const (
	mirrorWriteBlocking = "write-blocking"
	mirrorBackground    = "background"
	mirrorJobID         = "mirror"
	qemuExport          = "vol"
)

// qemuMirror is one qemu-storage-daemon with its mirror job and the nbdkit
// process its job writes to.
type qemuMirror struct {
	mode   string
	dir    string // its files (source image, QMP socket)
	addr   string // the NBD export's host:port
	cmd    *exec.Cmd
	exited chan struct{}
	qmp    *qmpConn
	backup *nbdkitProc
}

// blockJob is what query-block-jobs says of a job.
type blockJob struct {
	Device string `json:"device"`
	Type   string `json:"type"`
	Status string `json:"status"`
	Ready  bool   `json:"ready"`
	Busy   bool   `json:"busy"`
	Paused bool   `json:"paused"`
	Offset int64  `json:"offset"`
	Len    int64  `json:"len"`
}

// startQemuMirror starts the backup (nbdkit on dir/backup.img, in place
// backup), then qemu-storage-daemon serving dir/source.img (in place
// primary) with a blockdev-mirror job of the given copy mode
// to that backup, and waits until the job is READY. Both files are fresh
// and sparse, so sync=none mirrors everything that matters: what is
// written from now on.
func (b *bench) startQemuMirror(dir string, size int64, mode string, primary, backup place) (*qemuMirror, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	src := filepath.Join(dir, "source.img")
	for _, f := range []string{src, filepath.Join(dir, "backup.img")} {
		if err := freshFile(f, size); err != nil {
			return nil, err
		}
	}
	bk, err := b.startNbdkitOn(filepath.Join(dir, "backup.img"), size, backup)
	if err != nil {
		return nil, fmt.Errorf("qemu mirror's backup: %w", err)
	}
	q := &qemuMirror{mode: mode, dir: dir, backup: bk, exited: make(chan struct{})}
	b.mu.Lock()
	b.qemus = append(b.qemus, q)
	b.mu.Unlock()
	if err := q.start(b, src, primary); err != nil {
		return q, err
	}
	if err := q.startJob(); err != nil {
		return q, err
	}
	return q, nil
}

// freshFile creates (or empties) a sparse file of size bytes.
func freshFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("truncate %s: %w", path, err)
	}
	return f.Close()
}

// start runs qemu-storage-daemon in place at: its NBD server on a listener
// the harness opened in at's namespace (fd 3, as nbdkit's socket
// activation), its QMP monitor on a unix socket (unix sockets on the file
// system are reachable from any network namespace).
func (q *qemuMirror) start(b *bench, src string, at place) error {
	l, err := at.listen()
	if err != nil {
		return err
	}
	q.addr = l.Addr().String()
	lf, err := l.(*net.TCPListener).File()
	l.Close()
	if err != nil {
		return err
	}
	defer lf.Close()
	sock := filepath.Join(q.dir, "qmp.sock")
	_ = os.Remove(sock)
	bhost, bport, _ := net.SplitHostPort(q.backup.addr)
	args := []string{
		"--chardev", "socket,id=qmp0,path=" + sock + ",server=on,wait=off",
		"--monitor", "chardev=qmp0",
		"--blockdev", "driver=file,node-name=source-file,filename=" + src,
		"--blockdev", "driver=raw,node-name=source,file=source-file",
		"--blockdev", fmt.Sprintf("driver=nbd,node-name=target,server.type=inet,server.host=%s,server.port=%s", bhost, bport),
		"--nbd-server", "addr.type=fd,addr.str=3",
		"--export", "type=nbd,id=export0,node-name=source,name=" + qemuExport + ",writable=on",
	}
	logf, err := os.OpenFile(filepath.Join(b.work, "qemu-storage-daemon-"+q.mode+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	q.cmd = at.command("qemu-storage-daemon", args...)
	q.cmd.ExtraFiles = []*os.File{lf}
	q.cmd.Stdout, q.cmd.Stderr = logf, logf
	q.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := q.cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start qemu-storage-daemon: %w", err)
	}
	go func() { _ = q.cmd.Wait(); logf.Close(); close(q.exited) }()
	err = testkit.Wait(10*time.Second, "qemu-storage-daemon's QMP socket", func() (bool, error) {
		if !processAlive(q.exited) {
			return true, nil
		}
		var err error
		q.qmp, err = dialQMP(sock)
		return err == nil, err
	})
	if err != nil {
		return err
	}
	if !processAlive(q.exited) {
		return fmt.Errorf("qemu-storage-daemon (%s) exited at start (see qemu-storage-daemon-%s.log)", q.mode, q.mode)
	}
	return nil
}

// startJob starts the mirror job and waits for it to be READY (the
// BLOCK_JOB_READY event, or query-block-jobs saying so).
func (q *qemuMirror) startJob() error {
	args := map[string]any{"job-id": mirrorJobID, "device": "source", "target": "target", "sync": "none", "copy-mode": q.mode}
	if err := q.qmp.call("blockdev-mirror", args, nil); err != nil {
		return fmt.Errorf("blockdev-mirror (%s): %w", q.mode, err)
	}
	return testkit.Wait(30*time.Second, "the "+q.mode+" mirror job READY", func() (bool, error) {
		if q.qmp.seen("BLOCK_JOB_READY") {
			return true, nil
		}
		j, err := q.job()
		return err == nil && j.Ready, err
	})
}

func (q *qemuMirror) url() string { return "nbd://" + q.addr + "/" + qemuExport }

// pids are the processes doing the peer's work: the daemon and its target.
func (q *qemuMirror) pids() []int {
	return []int{q.cmd.Process.Pid, q.backup.cmd.Process.Pid}
}

// job is the mirror job as query-block-jobs reports it.
func (q *qemuMirror) job() (blockJob, error) {
	if !processAlive(q.exited) {
		return blockJob{}, errors.New("qemu-storage-daemon exited")
	}
	var jobs []blockJob
	if err := q.qmp.call("query-block-jobs", nil, &jobs); err != nil {
		return blockJob{}, fmt.Errorf("query-block-jobs: %w", err)
	}
	for _, j := range jobs {
		if j.Device == mirrorJobID {
			return j, nil
		}
	}
	return blockJob{}, fmt.Errorf("the mirror job is gone (jobs: %+v; events: %v)", jobs, q.qmp.events)
}

// healthy reports an error unless the job still mirrors: running or ready,
// and ready (synchronous) in write-blocking mode.
func (q *qemuMirror) healthy() error {
	if !processAlive(q.backup.exited) {
		return errors.New("the mirror's nbdkit target exited")
	}
	j, err := q.job()
	if err != nil {
		return err
	}
	if j.Status != "running" && j.Status != "ready" {
		return fmt.Errorf("mirror job %s", j.Status)
	}
	if q.mode == mirrorWriteBlocking && !j.Ready {
		return fmt.Errorf("write-blocking mirror job not ready (%s)", j.Status)
	}
	return nil
}

// drained reports whether the target holds every write: the job's dirty
// bitmap is clean, and the job has finished the copies it started (offset
// == len) and is idle. The bitmap is read first: len is only brought up to
// date when the job wakes, which a background job does every 100 ms.
func (q *qemuMirror) drained() (bool, error) {
	dirty, err := q.dirtyBytes()
	if err != nil {
		return false, err
	}
	if dirty > 0 {
		return false, fmt.Errorf("%d bytes dirty", dirty)
	}
	j, err := q.job()
	if err != nil {
		return false, err
	}
	return j.Offset == j.Len && !j.Busy, fmt.Errorf("offset %d of %d, busy %v", j.Offset, j.Len, j.Busy)
}

// dirtyBytes is what the dirty bitmaps of the daemon's block nodes count
// (the mirror job's own, anonymous bitmap is the only one).
func (q *qemuMirror) dirtyBytes() (int64, error) {
	var nodes []struct {
		Bitmaps []struct {
			Count int64 `json:"count"`
		} `json:"dirty-bitmaps"`
	}
	if err := q.qmp.call("query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return 0, fmt.Errorf("query-named-block-nodes: %w", err)
	}
	var n int64
	for _, node := range nodes {
		for _, bm := range node.Bitmaps {
			n += bm.Count
		}
	}
	return n, nil
}

func (q *qemuMirror) running() bool { return q.cmd != nil && processAlive(q.exited) }

func (q *qemuMirror) stop() {
	if q.qmp != nil {
		q.qmp.close()
	}
	if q.running() {
		_ = q.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-q.exited:
		case <-time.After(5 * time.Second):
			_ = q.cmd.Process.Kill()
			<-q.exited
		}
	}
	q.backup.stop()
}

// qmpConn is a QMP client: one command at a time; the events read while
// waiting for a reply are kept by name.
type qmpConn struct {
	c      net.Conn
	r      *bufio.Reader
	events []string
}

func dialQMP(path string) (*qmpConn, error) {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return nil, err
	}
	q := &qmpConn{c: c, r: bufio.NewReader(c)}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	line, err := q.r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &greeting)
	}
	if err == nil && greeting.QMP == nil {
		err = fmt.Errorf("no QMP greeting: %s", line)
	}
	if err == nil {
		err = q.call("qmp_capabilities", nil, nil)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("QMP %s: %w", path, err)
	}
	return q, nil
}

// call runs one command and decodes its return value into out (if not nil).
func (q *qmpConn) call(cmd string, args, out any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	data, err := json.Marshal(req)
	if err != nil {
		return err
	}
	_ = q.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := q.c.Write(append(data, '\n')); err != nil {
		return err
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return err
		}
		var msg struct {
			Event  string          `json:"event"`
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class, Desc string
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &msg); err != nil {
			return fmt.Errorf("QMP reply %q: %w", line, err)
		}
		switch {
		case msg.Event != "":
			q.events = append(q.events, msg.Event)
		case msg.Error != nil:
			return fmt.Errorf("%s: %s", msg.Error.Class, msg.Error.Desc)
		case out != nil:
			return json.Unmarshal(msg.Return, out)
		default:
			return nil
		}
	}
}

func (q *qmpConn) seen(event string) bool {
	for _, e := range q.events {
		if e == event {
			return true
		}
	}
	return false
}

func (q *qmpConn) close() { _ = q.c.Close() }
