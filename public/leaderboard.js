// The public leaderboard: GET /api/leaderboard, drawn with textContent (nicknames are never HTML).

function duration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  return tr;
}

async function load() {
  const body = document.getElementById("board");
  try {
    const answer = await fetch("/api/leaderboard");
    const { volunteers } = await answer.json();
    body.replaceChildren();
    if (!volunteers.length) {
      body.appendChild(row(["", "Nobody is listed yet: choose a nickname on the volunteer page.", "", ""]));
    }
    for (const v of volunteers) {
      const results = `${v.validated} result${v.validated === 1 ? "" : "s"}`;
      const tr = row([String(v.rank), v.nickname, duration(v.validated_seconds), results]);
      tr.dataset.nickname = v.nickname;
      body.appendChild(tr);
    }
  } catch (err) {
    body.replaceChildren(row(["", `The leaderboard could not be loaded: ${err}`, "", ""]));
  }
}

load();
