package volume

import (
	"math/bits"
	"sync"
)

// Payload buffers come from per-size-class pools (powers of two from 4 KiB
// to 32 MiB), so the write path does not allocate per request.
var pools [14]sync.Pool

func class(n int) int {
	if n <= 4096 {
		return 0
	}
	return bits.Len(uint(n-1)) - 12
}

func getBuf(n int) *[]byte {
	c := class(n)
	if c >= len(pools) {
		b := make([]byte, n)
		return &b
	}
	if p, ok := pools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 4096<<c)
	return &b
}

func putBuf(b *[]byte) {
	if b == nil {
		return
	}
	c := class(cap(*b))
	if c < len(pools) && cap(*b) == 4096<<c {
		pools[c].Put(b)
	}
}
