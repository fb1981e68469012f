// UVM Compute: the page's metronome. A hidden tab's timers are throttled (to once a minute after
// five minutes hidden), which would starve heartbeats and let leases expire while the volunteer
// chose to keep computing; a dedicated worker's timers are not throttled.
const every = Number(new URL(self.location.href).searchParams.get("ms")) || 1000;
setInterval(() => self.postMessage(performance.now()), every);
