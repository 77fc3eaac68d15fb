package pool

import (
	"errors"
	"fmt"
	"time"

	"github.com/rs/zerolog"
)

// Defaults used by DefaultConfig, and by New for fields left at zero where
// zero is not meaningful.
const (
	DefaultLow               = 2
	DefaultHigh              = 16
	DefaultPerSandbox        = 4
	DefaultQueueSize         = 256
	DefaultTenantQueueSize   = 32
	DefaultIdleTimeout       = 2 * time.Minute
	DefaultCreateConcurrency = 3
	DefaultCreateTimeout     = 30 * time.Second
	DefaultCreateRetries     = 3
	DefaultCreateBackoff     = 200 * time.Millisecond
	DefaultCreateBackoffMax  = 10 * time.Second
	DefaultRemoveTimeout     = 30 * time.Second
	DefaultMaxWait           = 30 * time.Second
	DefaultCloseGrace        = 15 * time.Second
)

// Config configures a Pool. Start from DefaultConfig. Fields documented
// with "0 means the default" take the default in New when left at zero.
type Config struct {
	// Low is the number of free (pre-created, unassigned) sandboxes the
	// pool keeps ready, so that a new tenant gets one without a cold start;
	// each one taken is replaced in the background. The pool therefore
	// holds at least Low sandboxes at all times (less only while they are
	// being made). 0 disables pre-creation.
	Low int
	// High bounds the number of sandboxes, counting free, assigned,
	// being created and being removed. At least 1 and at least Low.
	High int
	// PerSandbox bounds the runs in flight at once in one sandbox (one
	// tenant). 0 means the default.
	PerSandbox int
	// QueueSize bounds the requests waiting for a sandbox or a slot in one,
	// over all tenants; past it Run fails with ErrQueueFull. 0 means the
	// default.
	QueueSize int
	// TenantQueueSize bounds the waiting requests of one tenant; past it Run
	// fails with ErrTenantQueueFull. At most QueueSize. 0 means the default.
	TenantQueueSize int
	// AppQueueSize bounds the waiting requests of one application's
	// tenants (keys "<app>|<isolate key>", protocol.TenantKey); past it Run
	// fails with ErrQueueFull. The implicit application (plain keys) is
	// not bounded by it. It keeps room for other applications' requests
	// (a worker stops taking requests while its queue is full, so a queue
	// one application filled would leave the others in the stream behind
	// its backlog). At most QueueSize; 0 means half of QueueSize.
	AppQueueSize int
	// IdleTimeout recycles a tenant's sandbox that had no run in flight for
	// this long. 0 never recycles idle sandboxes.
	IdleTimeout time.Duration
	// MaxRequests recycles a sandbox after this many runs. 0 is unlimited.
	MaxRequests int
	// MaxAge recycles a sandbox (free or assigned) this old. 0 is unlimited.
	MaxAge time.Duration
	// CreateConcurrency bounds the Runtime.Create calls under way at once:
	// the engine serialises heavy parallel starts. Creations for waiting
	// tenants go before refills of free sandboxes. An idle sandbox is
	// evicted for a waiting tenant only while fewer creations than this
	// are under way. 0 means the default.
	CreateConcurrency int
	// RefillDelay holds back the replacement of a free sandbox a tenant
	// just took, so that the tenant's first run does not share the CPU
	// with the creation of the replacement (a container start costs
	// hundreds of milliseconds of CPU). 0 replaces it at once.
	RefillDelay time.Duration
	// CreateTimeout bounds one Runtime.Create attempt. 0 means the default.
	CreateTimeout time.Duration
	// CreateRetries is the number of attempts at a tenant's sandbox before
	// the requests waiting for it fail with ErrCreateFailed. Refills of
	// free sandboxes retry for as long as the pool is below Low. 0 means
	// the default.
	CreateRetries int
	// CreateBackoff is the first pause between attempts; it doubles at each
	// failure up to CreateBackoffMax, with jitter. 0 means the default.
	CreateBackoff    time.Duration
	CreateBackoffMax time.Duration
	// RemoveTimeout bounds one Sandbox.Close. 0 means the default.
	RemoveTimeout time.Duration
	// MaxWait bounds the time a request waits in the queue when its context
	// has no earlier deadline; past it Run fails with ErrQueueTimeout.
	// 0 means the default.
	MaxWait time.Duration
	// CloseGrace is how long Close lets runs in flight finish before it
	// removes their sandboxes. 0 does not wait.
	CloseGrace time.Duration
	// Clock is the pool's time source; nil means real time.
	Clock Clock
	// Logger receives the pool's events (creations, recycles, deaths,
	// failures). The zero value logs nothing.
	Logger zerolog.Logger
}

// DefaultConfig returns a Config with every default filled in.
func DefaultConfig() Config {
	return Config{
		Low:               DefaultLow,
		High:              DefaultHigh,
		PerSandbox:        DefaultPerSandbox,
		QueueSize:         DefaultQueueSize,
		TenantQueueSize:   DefaultTenantQueueSize,
		IdleTimeout:       DefaultIdleTimeout,
		CreateConcurrency: DefaultCreateConcurrency,
		CreateTimeout:     DefaultCreateTimeout,
		CreateRetries:     DefaultCreateRetries,
		CreateBackoff:     DefaultCreateBackoff,
		CreateBackoffMax:  DefaultCreateBackoffMax,
		RemoveTimeout:     DefaultRemoveTimeout,
		MaxWait:           DefaultMaxWait,
		CloseGrace:        DefaultCloseGrace,
	}
}

// withDefaults fills the zero fields that have a default.
func (c Config) withDefaults() Config {
	setInt := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	setDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	setInt(&c.PerSandbox, DefaultPerSandbox)
	setInt(&c.QueueSize, DefaultQueueSize)
	setInt(&c.TenantQueueSize, min(DefaultTenantQueueSize, c.QueueSize))
	setInt(&c.AppQueueSize, max(1, c.QueueSize/2))
	setInt(&c.CreateConcurrency, DefaultCreateConcurrency)
	setInt(&c.CreateRetries, DefaultCreateRetries)
	setDur(&c.CreateTimeout, DefaultCreateTimeout)
	setDur(&c.CreateBackoff, DefaultCreateBackoff)
	setDur(&c.CreateBackoffMax, max(DefaultCreateBackoffMax, c.CreateBackoff))
	setDur(&c.RemoveTimeout, DefaultRemoveTimeout)
	setDur(&c.MaxWait, DefaultMaxWait)
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	return c
}

// Validate checks c after defaults are applied (so zero fields that have a
// default pass). It returns every violation, each a field-level error
// wrapping ErrInvalidConfig that names the field.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: %s %s", ErrInvalidConfig, field, fmt.Sprintf(format, args...)))
	}
	if c.High < 1 {
		bad("High", "must be at least 1, got %d", c.High)
	}
	if c.Low < 0 {
		bad("Low", "must not be negative, got %d", c.Low)
	} else if c.High >= 1 && c.Low > c.High {
		bad("Low", "must not exceed High (%d), got %d", c.High, c.Low)
	}
	for _, f := range []struct {
		name string
		v    int
	}{
		{"PerSandbox", c.PerSandbox},
		{"QueueSize", c.QueueSize},
		{"TenantQueueSize", c.TenantQueueSize},
		{"AppQueueSize", c.AppQueueSize},
		{"CreateConcurrency", c.CreateConcurrency},
		{"CreateRetries", c.CreateRetries},
	} {
		if f.v < 1 {
			bad(f.name, "must be at least 1 (or 0 for the default), got %d", f.v)
		}
	}
	if c.AppQueueSize > c.QueueSize && c.QueueSize >= 1 {
		bad("AppQueueSize", "must not exceed QueueSize (%d), got %d", c.QueueSize, c.AppQueueSize)
	}
	if c.TenantQueueSize > c.QueueSize && c.QueueSize >= 1 {
		bad("TenantQueueSize", "must not exceed QueueSize (%d), got %d", c.QueueSize, c.TenantQueueSize)
	}
	if c.MaxRequests < 0 {
		bad("MaxRequests", "must not be negative (0 is unlimited), got %d", c.MaxRequests)
	}
	for _, f := range []struct {
		name string
		v    time.Duration
	}{
		{"IdleTimeout", c.IdleTimeout},
		{"MaxAge", c.MaxAge},
		{"CreateTimeout", c.CreateTimeout},
		{"CreateBackoff", c.CreateBackoff},
		{"CreateBackoffMax", c.CreateBackoffMax},
		{"RemoveTimeout", c.RemoveTimeout},
		{"MaxWait", c.MaxWait},
		{"CloseGrace", c.CloseGrace},
	} {
		if f.v < 0 {
			bad(f.name, "must not be negative, got %s", f.v)
		}
	}
	if c.CreateBackoffMax > 0 && c.CreateBackoffMax < c.CreateBackoff {
		bad("CreateBackoffMax", "must not be less than CreateBackoff (%s), got %s", c.CreateBackoff, c.CreateBackoffMax)
	}
	return errors.Join(errs...)
}
