package volume

import (
	"context"
	"crypto/sha256"
	"fmt"
	"syscall"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// MaxChecksumRegions bounds one RegionChecksums call, so a single control API
// request reads at most this many regions (the control API's limit).
const MaxChecksumRegions = agentapi.MaxChecksumRegions

// checksumChunk is how much of a region is read at a time; large regions
// (up to 64 MiB) are hashed in pieces so a call needs one small buffer.
const checksumChunk = 1 << 20

// RegionChecksums returns the SHA-256 of each of the count regions starting
// at region first, read from this member's local replica whatever its role:
// it is a read of the store for online verification (kubectl tandem verify),
// not client I/O, so it neither needs nor checks write authority.
//
// The sums are not a snapshot. While the pair is live a region being written
// can differ between the members for a moment (the write is applied on the
// primary before the backup); callers compare twice, a short while apart, and
// disregard regions set in either member's dirty bitmap.
//
// count is at most MaxChecksumRegions and [first, first+count) must lie in
// the volume; otherwise the error wraps syscall.EINVAL. ctx is checked
// between reads.
func (v *Volume) RegionChecksums(ctx context.Context, first, count uint32) ([][32]byte, error) {
	rs := v.opts.RegionSize
	regions := uint64(v.size.Load() / rs)
	if count > MaxChecksumRegions {
		return nil, fmt.Errorf("volume %s: checksums of %d regions asked, at most %d per call: %w", v.opts.Name, count, MaxChecksumRegions, syscall.EINVAL)
	}
	if uint64(first)+uint64(count) > regions {
		return nil, fmt.Errorf("volume %s: regions [%d, +%d) outside the volume's %d regions: %w", v.opts.Name, first, count, regions, syscall.EINVAL)
	}
	out := make([][32]byte, 0, count)
	if count == 0 {
		return out, nil
	}
	buf := getBuf(int(min(rs, checksumChunk)))
	defer putBuf(buf)
	h := sha256.New()
	for r := uint64(first); r < uint64(first)+uint64(count); r++ {
		h.Reset()
		off := int64(r) * rs
		for done := int64(0); done < rs; {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("volume %s: checksum of region %d: %w", v.opts.Name, r, err)
			}
			p := (*buf)[:min(rs-done, int64(len(*buf)))]
			if _, err := v.store.ReadAt(p, off+done); err != nil {
				err = fmt.Errorf("volume %s: checksum of region %d: reading %d bytes at %d: %w", v.opts.Name, r, len(p), off+done, err)
				v.setError(err)
				return nil, err
			}
			h.Write(p)
			done += int64(len(p))
		}
		var sum [32]byte
		h.Sum(sum[:0])
		out = append(out, sum)
	}
	return out, nil
}
