package bitmap

import (
	"errors"
	"fmt"
	"os"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/tandem-storage/tandem/internal/fsutil"
)

// A region set file keeps a set of regions outside the journal, durably:
// the volume's "unmerged" regions (a resync with mergePrimaryBitmap false
// left them different on the two members). It has the checkpoint format
// (see the package documentation) with generation 0 and the extent size
// equal to the region size, so it is decoded and checked by the same code.

// WriteRegionSet atomically replaces path with bm, a set of regions of a
// volume of size bytes with regions of regionSize.
func WriteRegionSet(path string, size, regionSize int64, bm *roaring.Bitmap) error {
	g, err := newGeometry(size, regionSize, 0)
	if err != nil {
		return fmt.Errorf("region set %s: %w", path, err)
	}
	if !bm.IsEmpty() && bm.Maximum() >= g.regions {
		return fmt.Errorf("region set %s: region %d outside %d regions", path, bm.Maximum(), g.regions)
	}
	b, err := encodeCheckpoint(0, &g, bm)
	if err != nil {
		return fmt.Errorf("region set %s: %w", path, err)
	}
	return fsutil.WriteFileAtomic(path, b, 0o600)
}

// ReadRegionSet reads a region set written by WriteRegionSet. A missing
// file is an empty set; a damaged one or one of another region size is an
// error wrapping ErrCorrupt or ErrGeometry. A file written for another
// volume size is read as it is (region numbers do not change when a
// volume grows), without the regions past the end of a volume of size
// bytes.
func ReadRegionSet(path string, size, regionSize int64) (*roaring.Bitmap, error) {
	g, err := newGeometry(size, regionSize, 0)
	if err != nil {
		return nil, fmt.Errorf("region set %s: %w", path, err)
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return roaring.New(), nil
	}
	if err != nil {
		return nil, fmt.Errorf("region set %s: %w", path, err)
	}
	_, bm, err := decodeCheckpoint(b, &g)
	if err != nil {
		return nil, fmt.Errorf("region set %s: %w", path, err)
	}
	return bm, nil
}
