// Package csifake has in-memory twins of the CSI node service's Attacher
// and Mounter: the CSI conformance suite runs against them in `make test`
// (no root, no FUSE, no mkfs needed), and they record what the node service
// asked for so tests can check it.
package csifake

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tandem-storage/tandem/internal/csi"
)

// Attacher "attaches" a volume as a sparse file of the volume's size in Dir.
type Attacher struct {
	Dir string

	mu       sync.Mutex
	attached map[string]string // volume ID → file
}

// Attach creates the file (idempotent).
func (a *Attacher) Attach(_ context.Context, vol csi.Volume) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.attached == nil {
		a.attached = map[string]string{}
	}
	if dev, ok := a.attached[vol.ID]; ok {
		return dev, nil
	}
	sum := sha256.Sum256([]byte(vol.ID))
	dev := filepath.Join(a.Dir, hex.EncodeToString(sum[:8])+".img")
	f, err := os.OpenFile(dev, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := f.Truncate(vol.Size); err != nil {
		return "", err
	}
	a.attached[vol.ID] = dev
	return dev, nil
}

// Expand grows an attached volume's file to vol.Size (never shrinks it)
// and returns its size, as a device that learnt its export's new size.
func (a *Attacher) Expand(_ context.Context, vol csi.Volume) (int64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	dev, ok := a.attached[vol.ID]
	if !ok {
		return 0, status.Errorf(codes.NotFound, "volume %s is not attached", vol.ID)
	}
	fi, err := os.Stat(dev)
	if err != nil {
		return 0, err
	}
	if fi.Size() >= vol.Size {
		return fi.Size(), nil
	}
	if err := os.Truncate(dev, vol.Size); err != nil {
		return 0, err
	}
	return vol.Size, nil
}

// Detach removes the file (idempotent).
func (a *Attacher) Detach(_ context.Context, id string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	dev, ok := a.attached[id]
	if !ok {
		return nil
	}
	delete(a.attached, id)
	if err := os.Remove(dev); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Path returns the file of an attached volume ("" when not attached).
func (a *Attacher) Path(id string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.attached[id]
}

// Attached returns the volume IDs attached now.
func (a *Attacher) Attached() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var ids []string
	for id := range a.attached {
		ids = append(ids, id)
	}
	return ids
}

// Mounter records mounts instead of making them.
type Mounter struct {
	mu     sync.Mutex
	mounts map[string]Mount  // target → mount
	fs     map[string]string // device → filesystem made on it
	// resized are the devices Resize grew.
	resized []string
}

// Mount is one recorded mount.
type Mount struct {
	Source, FSType string
	Bind, ReadOnly bool
	Options        []string
}

func (m *Mounter) init() {
	if m.mounts == nil {
		m.mounts = map[string]Mount{}
		m.fs = map[string]string{}
	}
}

// Mount records a mount; the target must exist, like for mount(2).
func (m *Mounter) Mount(source, target, fstype string, bind, readOnly bool, options []string) error {
	if _, err := os.Stat(target); err != nil {
		return fmt.Errorf("mount target: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	if _, ok := m.mounts[target]; ok {
		return fmt.Errorf("%s is already a mount point", target)
	}
	if !bind && m.fs[source] != fstype {
		return fmt.Errorf("mounting %s as %s: it holds %q", source, fstype, m.fs[source])
	}
	m.mounts[target] = Mount{Source: source, FSType: fstype, Bind: bind, ReadOnly: readOnly, Options: options}
	return nil
}

// Unmount forgets a mount.
func (m *Mounter) Unmount(target string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.mounts[target]; !ok {
		return fmt.Errorf("%s is not mounted", target)
	}
	delete(m.mounts, target)
	return nil
}

// IsMountPoint says whether a mount is recorded at path; os.ErrNotExist
// when path does not exist.
func (m *Mounter) IsMountPoint(path string) (bool, error) {
	if _, err := os.Stat(path); err != nil {
		return false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.mounts[path]
	return ok, nil
}

// Filesystem returns what Format made on device.
func (m *Mounter) Filesystem(device string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	return m.fs[device], nil
}

// Format records a filesystem on device.
func (m *Mounter) Format(_ context.Context, device, fstype string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	m.fs[device] = fstype
	return nil
}

// Mounts returns the recorded mounts.
func (m *Mounter) Mounts() map[string]Mount {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]Mount{}
	for k, v := range m.mounts {
		out[k] = v
	}
	return out
}

// Resize records a grown filesystem: the device must hold fstype and be
// mounted at path.
func (m *Mounter) Resize(_ context.Context, device, path, fstype string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	if m.fs[device] != fstype {
		return fmt.Errorf("resizing %s as %s: it holds %q", device, fstype, m.fs[device])
	}
	if mt, ok := m.mounts[path]; !ok || mt.Source != device {
		return fmt.Errorf("resizing %s: it is not mounted at %s", device, path)
	}
	m.resized = append(m.resized, device)
	return nil
}

// Resized lists the devices whose filesystems Resize grew, in order.
func (m *Mounter) Resized() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.resized...)
}
