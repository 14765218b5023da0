package volume

// SetMaxOwnBitmap sets the largest own diff a backup sends in its
// handshake, for the test's duration.
func SetMaxOwnBitmap(t interface{ Cleanup(func()) }, n int) {
	old := maxOwnBitmap
	maxOwnBitmap = n
	t.Cleanup(func() { maxOwnBitmap = old })
}
