package attach

import (
	"errors"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// loopDevice is a loop device bound to a backing file.
type loopDevice struct {
	path string
	f    *os.File // held open while attached
}

// attachLoop binds a free loop device to backing (LOOP_CONFIGURE, so the
// device appears at once with the file's size). The device keeps its own
// reference to the file. It is auto-cleared: once neither this process (it
// holds the device open while attached) nor a mount uses it, the kernel
// unbinds it, so a node plugin that dies leaves no loop device behind once
// the kubelet has unmounted its volumes.
func attachLoop(backing *os.File, name string) (*loopDevice, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("loop devices: %w", err)
	}
	defer ctl.Close()
	// Another process may take the free device between GET_FREE and
	// CONFIGURE (EBUSY): try again.
	for attempt := 0; attempt < 10; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("finding a free loop device: %w", err)
		}
		path := fmt.Sprintf("/dev/loop%d", n)
		f, err := openLoop(path)
		if err != nil {
			return nil, err
		}
		cfg := &unix.LoopConfig{Fd: uint32(backing.Fd()), Size: 4096}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		copy(cfg.Info.File_name[:], name)
		err = unix.IoctlLoopConfigure(int(f.Fd()), cfg)
		if errors.Is(err, unix.EBUSY) {
			_ = f.Close()
			continue
		}
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("binding %s to %s: %w", path, backing.Name(), err)
		}
		return &loopDevice{path: path, f: f}, nil
	}
	return nil, errors.New("no free loop device after 10 tries")
}

// openLoop opens a loop device node, waiting briefly for udev-less systems
// where the kernel creates it on demand.
func openLoop(path string) (*os.File, error) {
	var err error
	for i := 0; i < 50; i++ {
		var f *os.File
		f, err = os.OpenFile(path, os.O_RDWR, 0)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil, fmt.Errorf("opening %s: %w", path, err)
}

// detach unbinds the device from its file; the kernel does it once the
// last user (a mount) lets go (EBUSY is retried for a while).
func (l *loopDevice) detach() error {
	defer l.f.Close()
	var err error
	for i := 0; i < 50; i++ {
		err = unix.IoctlSetInt(int(l.f.Fd()), unix.LOOP_CLR_FD, 0)
		if err == nil || errors.Is(err, unix.ENXIO) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("unbinding %s: %w", l.path, err)
}

// setCapacity makes the device take its file's size now (LOOP_SET_CAPACITY)
// and returns the device's size.
func (l *loopDevice) setCapacity() (int64, error) {
	if err := unix.IoctlSetInt(int(l.f.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return 0, fmt.Errorf("LOOP_SET_CAPACITY on %s: %w", l.path, err)
	}
	return deviceSize(l.f)
}

// deviceSize is a block device's size in bytes (BLKGETSIZE64).
func deviceSize(f *os.File) (int64, error) {
	var n uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n))); e != 0 {
		return 0, fmt.Errorf("BLKGETSIZE64 on %s: %w", f.Name(), e)
	}
	return int64(n), nil
}
