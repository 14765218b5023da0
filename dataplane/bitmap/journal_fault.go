package bitmap

import (
	"fmt"
	"time"
)

// Retry timing after a failed log append: the first reopen of the log may be
// attempted minRetryDelay after the failure, and the delay doubles with every
// failed attempt up to maxRetryDelay.
const (
	minRetryDelay = 100 * time.Millisecond
	maxRetryDelay = 5 * time.Second
)

// FaultOp names a journal I/O operation, for a fault hook (SetFaultHook).
type FaultOp int

// The operations a fault hook can fail.
const (
	// FaultAppend is the pwrite of a group commit's record.
	FaultAppend FaultOp = iota
	// FaultSync is the fdatasync after a group commit.
	FaultSync
	// FaultCreateLog is writing and syncing a new log file.
	FaultCreateLog
	// FaultCheckpoint is writing and installing a checkpoint.
	FaultCheckpoint
)

func (o FaultOp) String() string {
	switch o {
	case FaultAppend:
		return "append"
	case FaultSync:
		return "sync"
	case FaultCreateLog:
		return "create-log"
	case FaultCheckpoint:
		return "checkpoint"
	}
	return fmt.Sprintf("FaultOp(%d)", int(o))
}

// SetFaultHook makes fn run before every journal I/O operation of the kinds
// FaultOp names; a non-nil error fails that operation as if the disk had
// returned it, before it reaches the file. It is for fault-injection tests
// (a full disk is fn returning syscall.ENOSPC); nil removes the hook.
func (j *Journal) SetFaultHook(fn func(FaultOp) error) {
	if fn == nil {
		j.faultHook.Store(nil)
		return
	}
	j.faultHook.Store(&fn)
}

// fault runs the fault hook for op, if any.
func (j *Journal) fault(op FaultOp) error {
	if fn := j.faultHook.Load(); fn != nil {
		return (*fn)(op)
	}
	return nil
}

// Err returns why the journal cannot mark new extents now (a log append
// failed and no new log could be opened since), or nil when it can. While
// it is failed, Marks of extents not already marked fail; the journal
// reopens its log by itself on a Mark after a backoff, or on a Checkpoint,
// once the disk works again.
func (j *Journal) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

// failLocked records a failure of the log (an append, or an attempt to
// reopen it) and schedules the next attempt; j.mu held.
func (j *Journal) failLocked(err error) {
	j.err = err
	j.retryAt = time.Now().Add(j.retryDelay)
	j.retryDelay = min(2*j.retryDelay, maxRetryDelay)
	j.failures.Add(1)
}

// recoveredLocked clears the failure once a new log is in use; j.mu held.
func (j *Journal) recoveredLocked(how string) {
	if j.err == nil {
		return
	}
	j.log.Info("bitmap intent log usable again", "dir", j.dir, "generation", j.gen, "by", how, "failedWith", j.err.Error())
	j.err = nil
	j.retryDelay = j.minRetry
	j.reopens.Add(1)
}

// reopenLog replaces a failed log: it creates log generation gen+1 (durably,
// like rotate's step 1) and appends there from now on. The failed log stays:
// the checkpoint on disk still needs it, and its extents stay in the marked
// set, so the next Checkpoint covers them before removing it. Its tail may
// hold a torn record from the failed append; nothing is ever appended after
// it, so recovery ignores it (a torn last record). No checkpoint is written:
// checkpoint G means "replay logs G, G+1, …", which now include gen+1.
func (j *Journal) reopenLog() error {
	j.ckptMu.Lock() // serializes generation changes with rotate
	defer j.ckptMu.Unlock()
	j.mu.Lock()
	if j.closing {
		j.mu.Unlock()
		return ErrClosed
	}
	if j.err == nil { // a Checkpoint reopened it meanwhile
		j.mu.Unlock()
		return nil
	}
	newGen := j.gen + 1
	j.mu.Unlock()

	nf, off, err := j.createLog(newGen, nil)

	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("reopening the intent log: %w", err)
		j.failLocked(err)
		return err
	}
	if j.closing {
		nf.Close()
		return ErrClosed
	}
	j.swapping = true
	for j.flushing {
		j.cond.Wait()
	}
	oldF := j.f
	j.f, j.gen, j.off = nf, newGen, off
	j.swapping = false
	j.recoveredLocked("reopen")
	j.cond.Broadcast()
	if oldF != nil {
		_ = oldF.Close()
	}
	return nil
}
