/*
 * The clinicians' page: one small script against the locator's FHIR R4 API (no build step).
 *
 * - The NHS Number is checked as it is typed (ten digits, modulus-11 check digit) and is sent
 *   only in the body of POST fhir/ImagingStudy/_search, never in the page's URL.
 * - Results: a summary per holding trust and a newest-first timeline; "View" opens the trust's
 *   viewer (the contained ihe-iid Endpoint), "Source" is the DICOMweb retrieve URL (the trust's
 *   dicom-wado-rs Endpoint address + /studies/{uid}). Paging follows the Bundle's next link,
 *   which carries only an opaque cursor.
 * - Authentication (when web-config.json says the API wants a token): OpenID Connect
 *   authorization code flow with PKCE (RFC 7636, S256) against the configured issuer, or an
 *   access token handed in by a launching system in the URL fragment (#access_token=...). The
 *   token lives in sessionStorage only and is sent as "Authorization: Bearer".
 */
"use strict";

(function () {
  const NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number";
  const DICOM_UID_SYSTEM = "urn:dicom:uid";
  const OID_PREFIX = "urn:oid:";
  const ACSN = "ACSN";
  const IHE_IID = "ihe-iid";
  const DICOM_WADO_RS = "dicom-wado-rs";
  const REPORT_STATUS_SUFFIX = "/report-status";
  const PAGE_SIZE = "20";
  const SEARCH_URL = "fhir/ImagingStudy/_search";
  const CONFIG_URL = "web-config.json";
  const TOKEN_KEY = "locator.token";
  const PENDING_KEY = "locator.oidc";
  const TIME_ZONE = "Europe/London";
  const NOT_IMAGED = new Set(["cancelled", "entered-in-error"]);

  const STUDY_STATUS = {
    registered: ["Registered: images not yet available", "tag--grey"],
    available: ["Images available", "tag--green"],
    cancelled: ["Cancelled", "tag--red"],
    "entered-in-error": ["Entered in error", "tag--red"],
  };
  const REPORT_STATUS = {
    registered: "Report awaited",
    partial: "Preliminary report",
    preliminary: "Preliminary report",
    final: "Final report",
    amended: "Amended report",
    corrected: "Corrected report",
    appended: "Report with addendum",
    cancelled: "Report cancelled",
    "entered-in-error": "Report entered in error",
  };

  const $ = (id) => document.getElementById(id);
  const el = {};
  let config = { auth: false };
  let search = null; // the search on screen: {nhs, studies, endpoints, next, total, seq}
  let searchSeq = 0;

  // ------------------------------------------------------------------ NHS Number

  function checkNhsNumber(raw) {
    const digits = raw.replace(/[\s-]/g, "");
    if (digits === "") return { state: "empty", digits };
    if (!/^[0-9]+$/.test(digits)) {
      return { state: "invalid", digits, message: "An NHS Number can only contain numbers and spaces" };
    }
    if (digits.length < 10) {
      return { state: "partial", digits, message: `An NHS Number is 10 digits. You have entered ${digits.length}` };
    }
    if (digits.length > 10) {
      return { state: "invalid", digits, message: `An NHS Number is 10 digits. You have entered ${digits.length}` };
    }
    if (/^(\d)\1{9}$/.test(digits) || !checkDigitMatches(digits)) {
      return {
        state: "invalid",
        digits,
        message: "This is not a valid NHS Number: the check digit does not match. Check the number and try again",
      };
    }
    return { state: "valid", digits };
  }

  function checkDigitMatches(digits) {
    let total = 0;
    for (let i = 0; i < 9; i += 1) total += Number(digits[i]) * (10 - i);
    let check = 11 - (total % 11);
    if (check === 11) check = 0;
    return check !== 10 && check === Number(digits[9]);
  }

  function formatNhs(digits) {
    return `${digits.slice(0, 3)} ${digits.slice(3, 6)} ${digits.slice(6)}`;
  }

  function showNhsCheck(result, submitting) {
    const showError = result.state === "invalid" || (submitting && result.state !== "valid");
    let message = result.message || "";
    if (submitting && result.state === "empty") message = "Enter an NHS Number";
    el.nhsGroup.classList.toggle("form-group--error", showError);
    el.nhsInput.setAttribute("aria-invalid", showError ? "true" : "false");
    el.nhsError.textContent = "";
    if (showError) {
      const hidden = document.createElement("span");
      hidden.className = "visually-hidden";
      hidden.textContent = "Error: ";
      el.nhsError.append(hidden, message);
    }
    el.nhsValid.textContent = result.state === "valid" ? "✓ Valid NHS Number" : "";
  }

  // ------------------------------------------------------------------ tokens and sign-in

  function storedToken() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(TOKEN_KEY) || "null");
      if (saved && saved.access_token && (!saved.expires_at || saved.expires_at > Date.now())) {
        return saved.access_token;
      }
    } catch (_) {
      /* an unreadable entry is as good as none */
    }
    sessionStorage.removeItem(TOKEN_KEY);
    return null;
  }

  function storeToken(accessToken, expiresIn) {
    const seconds = Number(expiresIn);
    const expiresAt = Number.isFinite(seconds) && seconds > 0 ? Date.now() + seconds * 1000 : null;
    sessionStorage.setItem(TOKEN_KEY, JSON.stringify({ access_token: accessToken, expires_at: expiresAt }));
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
  }

  /* A launching system may hand over a token (and the NHS Number) in the fragment, which never
     reaches a server; it is removed from the address bar at once. */
  function takeFragment() {
    if (!location.hash || location.hash.length < 2) return null;
    const params = new URLSearchParams(location.hash.slice(1));
    history.replaceState(null, "", location.pathname + location.search);
    if (params.get("access_token")) storeToken(params.get("access_token"), params.get("expires_in"));
    return params.get("nhs-number") || params.get("nhs_number");
  }

  function base64url(bytes) {
    let text = "";
    bytes.forEach((b) => {
      text += String.fromCharCode(b);
    });
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function randomString(size) {
    const bytes = new Uint8Array(size);
    crypto.getRandomValues(bytes);
    return base64url(bytes);
  }

  async function s256(verifier) {
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
    return base64url(new Uint8Array(digest));
  }

  function redirectUri() {
    return location.origin + location.pathname;
  }

  async function discover() {
    if (!config.issuer || !config.client_id) {
      throw new Error("Sign-in is not configured on this service (no issuer or client id).");
    }
    const url = config.issuer.replace(/\/+$/, "") + "/.well-known/openid-configuration";
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error("The sign-in service could not be reached.");
    return response.json();
  }

  async function signIn() {
    try {
      const meta = await discover();
      const state = randomString(16);
      const verifier = randomString(48);
      sessionStorage.setItem(PENDING_KEY, JSON.stringify({ state, verifier }));
      const url = new URL(meta.authorization_endpoint);
      url.searchParams.set("response_type", "code");
      url.searchParams.set("client_id", config.client_id);
      url.searchParams.set("redirect_uri", redirectUri());
      url.searchParams.set("scope", config.scope || "openid");
      url.searchParams.set("state", state);
      url.searchParams.set("code_challenge", await s256(verifier));
      url.searchParams.set("code_challenge_method", "S256");
      location.assign(url.toString());
    } catch (error) {
      showError("Sign-in failed", error.message);
    }
  }

  /* Back from the identity provider with ?code=&state= (or ?error=): swap the code for a token. */
  async function finishSignIn() {
    const params = new URLSearchParams(location.search);
    if (!params.has("code") && !params.has("error")) return;
    history.replaceState(null, "", location.pathname);
    const pending = JSON.parse(sessionStorage.getItem(PENDING_KEY) || "null");
    sessionStorage.removeItem(PENDING_KEY);
    if (params.has("error")) {
      throw new Error(`The sign-in service said: ${params.get("error_description") || params.get("error")}`);
    }
    if (!pending || pending.state !== params.get("state")) {
      throw new Error("The sign-in response did not match this page's request. Sign in again.");
    }
    const meta = await discover();
    const body = new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: redirectUri(),
      client_id: config.client_id,
      code_verifier: pending.verifier,
    });
    const response = await fetch(meta.token_endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
      body,
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok || !answer.access_token) {
      throw new Error("The sign-in service did not issue a token. Sign in again.");
    }
    storeToken(answer.access_token, answer.expires_in);
  }

  function showSignedIn() {
    const token = storedToken();
    const needSignIn = config.auth && !token;
    el.signInPanel.hidden = !needSignIn;
    el.form.hidden = needSignIn;
    el.account.hidden = !token;
  }

  // ------------------------------------------------------------------ FHIR requests

  class ApiError extends Error {
    constructor(status, message, requestId) {
      super(message);
      this.status = status;
      this.requestId = requestId;
    }
  }

  async function fhir(url, init) {
    const headers = { Accept: "application/fhir+json", ...(init && init.headers) };
    const token = storedToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(url, { ...init, headers, credentials: "same-origin", cache: "no-store" });
    } catch (_) {
      throw new ApiError(0, "");
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      throw new ApiError(response.status, outcomeText(body), response.headers.get("X-Request-ID"));
    }
    return body;
  }

  function outcomeText(body) {
    if (!body || body.resourceType !== "OperationOutcome" || !Array.isArray(body.issue)) return "";
    return body.issue
      .map((i) => i.diagnostics || (i.details && i.details.text) || "")
      .filter(Boolean)
      .join(" ");
  }

  function firstPage(nhs) {
    const body = new URLSearchParams();
    body.set("patient.identifier", `${NHS_SYSTEM}|${nhs}`);
    body.set("_include", "ImagingStudy:endpoint");
    body.set("_count", PAGE_SIZE);
    return fhir(SEARCH_URL, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body,
    });
  }

  function nextLink(bundle) {
    const link = (bundle.link || []).find((l) => l.relation === "next");
    return link ? link.url : null;
  }

  // ------------------------------------------------------------------ reading the Bundle

  function code(concept) {
    if (!concept) return null;
    if (Array.isArray(concept)) return concept.length ? code(concept[0]) : null;
    return concept.code || null;
  }

  function orgOf(resource) {
    const ref = resource && resource.managingOrganization;
    if (!ref) return null;
    const ods = (ref.identifier && ref.identifier.value) || (ref.reference || "").split("/").pop() || null;
    return { ods, name: ref.display || ods };
  }

  function studyUid(study) {
    const id = (study.identifier || []).find((i) => i.system === DICOM_UID_SYSTEM && i.value);
    return id ? id.value.replace(OID_PREFIX, "") : null;
  }

  function accessionOf(study) {
    const id = (study.identifier || []).find(
      (i) => i.type && (i.type.coding || []).some((c) => c.code === ACSN),
    );
    return id || null;
  }

  function procedureText(study) {
    const names = (study.procedureCode || []).map((concept) => {
      const coding = (concept.coding || [])[0] || {};
      return concept.text || coding.display || coding.code;
    });
    // The same procedure may arrive from both feeds (MPPS and ORU), coded slightly differently.
    return [...new Set(names.filter(Boolean))].join(", ") || "Procedure not recorded";
  }

  function reportStatusOf(study) {
    const ext = (study.extension || []).find((e) => (e.url || "").endsWith(REPORT_STATUS_SUFFIX));
    return ext ? ext.valueCode : null;
  }

  function readStudy(resource, endpoints) {
    const contained = resource.contained || [];
    let viewer = null;
    let dicomweb = null;
    let trust = null;
    for (const ref of resource.endpoint || []) {
      const reference = ref.reference || "";
      const endpoint = reference.startsWith("#")
        ? contained.find((c) => c.id === reference.slice(1))
        : endpoints.get(reference);
      if (!endpoint) continue;
      const kind = code(endpoint.connectionType);
      if (kind === IHE_IID) viewer = endpoint;
      if (kind === DICOM_WADO_RS) dicomweb = endpoint;
      trust = trust || orgOf(endpoint);
    }
    const accession = accessionOf(resource);
    if (!trust && accession && accession.assigner) trust = orgOf({ managingOrganization: accession.assigner });
    const uid = studyUid(resource);
    return {
      id: resource.id,
      started: resource.started ? new Date(resource.started) : null,
      modalities: (resource.modality || []).map((m) => m.code).filter(Boolean),
      procedure: procedureText(resource),
      status: resource.status,
      reportStatus: reportStatusOf(resource),
      accession: accession ? accession.value : null,
      trust: trust || { ods: null, name: "Trust not known" },
      viewerUrl: viewer ? viewer.address : null,
      sourceUrl: dicomweb && uid ? `${dicomweb.address.replace(/\/+$/, "")}/studies/${uid}` : null,
      numberOfSeries: resource.numberOfSeries,
      numberOfInstances: resource.numberOfInstances,
    };
  }

  function readBundle(bundle) {
    const entries = bundle.entry || [];
    for (const entry of entries) {
      const res = entry.resource || {};
      if (res.resourceType === "Endpoint") search.endpoints.set(`Endpoint/${res.id}`, res);
    }
    const added = [];
    for (const entry of entries) {
      const res = entry.resource || {};
      if (res.resourceType === "ImagingStudy") added.push(readStudy(res, search.endpoints));
    }
    search.studies.push(...added);
    search.next = nextLink(bundle);
    if (typeof bundle.total === "number") search.total = bundle.total;
    return added;
  }

  /* Trust names normally come with the _include'd Endpoints; otherwise one read per trust. */
  async function fillTrustNames(studies) {
    const missing = new Set(
      studies.filter((s) => s.trust.ods && s.trust.name === s.trust.ods).map((s) => s.trust.ods),
    );
    for (const ods of missing) {
      try {
        const org = await fhir(`fhir/Organization/${encodeURIComponent(ods)}`);
        search.studies.forEach((s) => {
          if (s.trust.ods === ods && org && org.name) s.trust.name = org.name;
        });
      } catch (_) {
        /* the ODS code stands in for the name */
      }
    }
  }

  // ------------------------------------------------------------------ formatting

  const dateFormat = new Intl.DateTimeFormat("en-GB", {
    day: "numeric", month: "short", year: "numeric", timeZone: TIME_ZONE,
  });
  const longDateFormat = new Intl.DateTimeFormat("en-GB", {
    day: "numeric", month: "long", year: "numeric", timeZone: TIME_ZONE,
  });
  const timeFormat = new Intl.DateTimeFormat("en-GB", {
    hour: "2-digit", minute: "2-digit", timeZone: TIME_ZONE,
  });

  function shortDate(date) {
    return date ? dateFormat.format(date) : "Date not recorded";
  }

  function longDate(date) {
    return date ? longDateFormat.format(date) : "date not recorded";
  }

  function node(tag, className, text) {
    const item = document.createElement(tag);
    if (className) item.className = className;
    if (text !== undefined && text !== null) item.textContent = text;
    return item;
  }

  function hiddenText(text) {
    return node("span", "visually-hidden", text);
  }

  function tag(text, variant) {
    return node("strong", `tag ${variant || ""}`.trim(), text);
  }

  function modalityText(study) {
    return study.modalities.length ? study.modalities.join(" + ") : "Modality not recorded";
  }

  // ------------------------------------------------------------------ summary per trust

  function summarise(studies) {
    const trusts = new Map();
    for (const s of studies) {
      const key = s.trust.ods || s.trust.name;
      if (!trusts.has(key)) {
        trusts.set(key, { trust: s.trust, last: null, counts: new Map(), total: 0, notImaged: 0 });
      }
      const t = trusts.get(key);
      t.total += 1;
      if (NOT_IMAGED.has(s.status)) {
        t.notImaged += 1;
        continue;
      }
      for (const m of s.modalities.length ? s.modalities : ["Other"]) {
        t.counts.set(m, (t.counts.get(m) || 0) + 1);
      }
      if (s.started && (!t.last || s.started > t.last.started)) t.last = s;
    }
    const time = (t) => (t.last ? t.last.started.getTime() : -Infinity);
    return [...trusts.values()].sort((a, b) => time(b) - time(a));
  }

  function renderSummary() {
    el.resultsCount.textContent = `${countText()}, newest first.`;
    const rows = summarise(search.studies);
    el.summary.replaceChildren(...rows.map(summaryCard));
    const latest = rows.find((r) => r.last);
    el.summaryLead.textContent = latest
      ? `Last imaged at ${latest.trust.name} on ${longDate(latest.last.started)} (${latest.last.procedure}).`
      : "No completed imaging is recorded in the studies shown.";
    const shown = search.studies.length;
    el.summaryNote.hidden = !search.next;
    if (search.next) {
      const of = search.total && search.total > shown ? ` of ${search.total}` : "";
      el.summaryNote.textContent = `Summary of the ${shown} most recent studies${of}. Show older studies to include the rest.`;
    }
  }

  function summaryCard(row) {
    const card = node("li", "summary__card");
    card.append(node("h4", "summary__trust", row.trust.name));
    if (row.trust.ods) card.append(node("p", "summary__ods", `ODS code ${row.trust.ods}`));
    const list = node("dl", "summary__facts");
    const last = row.last
      ? `${shortDate(row.last.started)}, ${row.last.procedure}`
      : "No completed imaging";
    addFact(list, "Last imaged", last);
    const counts = [...row.counts.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    addFact(list, "Studies by modality", counts.length ? counts.map(([m, n]) => `${m} ${n}`).join(" · ") : "None");
    card.append(list);
    if (row.notImaged) {
      const what = row.notImaged === 1 ? "study" : "studies";
      card.append(node("p", "summary__other", `Also ${row.notImaged} cancelled ${what}, not counted above.`));
    }
    return card;
  }

  function addFact(list, term, value) {
    const wrap = node("div", "fact");
    wrap.append(node("dt", null, term), node("dd", null, value));
    list.append(wrap);
  }

  // ------------------------------------------------------------------ timeline

  function studyItem(study, index) {
    const item = node("li", "study");
    item.tabIndex = -1;
    const titleId = `study-${index}-title`;
    item.setAttribute("aria-labelledby", titleId);

    const when = node("div", "study__when");
    const time = node("time", "study__date", shortDate(study.started));
    if (study.started) {
      time.dateTime = study.started.toISOString();
      when.append(time, node("span", "study__time", timeFormat.format(study.started)));
    } else {
      when.append(time);
    }

    const body = node("div", "study__body");
    const title = node("h4", "study__title");
    title.id = titleId;
    title.append(node("span", "modality", modalityText(study)), " ", study.procedure);
    title.append(hiddenText(`, ${longDate(study.started)}`));
    body.append(title, node("p", "study__trust", study.trust.name));

    const meta = node("dl", "study__meta");
    const [statusText, statusClass] = STUDY_STATUS[study.status] || [study.status || "Unknown", "tag--grey"];
    addTagFact(meta, "Study status", tag(statusText, statusClass));
    const report = study.reportStatus ? REPORT_STATUS[study.reportStatus] || study.reportStatus : "No report yet";
    addTagFact(meta, "Report", tag(report, study.reportStatus ? "tag--blue" : "tag--white"));
    if (study.accession) addFact(meta, "Accession", study.accession);
    body.append(meta, actions(study, index));

    item.append(when, body);
    return item;
  }

  function addTagFact(list, term, value) {
    const wrap = node("div", "fact");
    const dd = node("dd");
    dd.append(value);
    wrap.append(node("dt", null, term), dd);
    list.append(wrap);
  }

  function describe(study) {
    return `${study.procedure}, ${longDate(study.started)}, ${study.trust.name}`;
  }

  function actions(study, index) {
    const box = node("div", "study__actions");
    if (study.viewerUrl) {
      const view = node("a", "button button--small", "View");
      view.href = study.viewerUrl;
      view.target = "_blank";
      view.rel = "noopener noreferrer";
      view.append(hiddenText(` ${describe(study)} (opens in a new tab)`));
      box.append(view);
    } else {
      box.append(node("p", "hint", "No viewer link for this study"));
    }
    box.append(sourceField(study, index));
    return box;
  }

  function sourceField(study, index) {
    const wrap = node("div", "source");
    if (!study.sourceUrl) {
      const why = NOT_IMAGED.has(study.status)
        ? `Source: no images to retrieve (${STUDY_STATUS[study.status][0].toLowerCase()})`
        : "Source: DICOMweb address not available yet (Study UID not known)";
      wrap.append(node("p", "hint", why));
      return wrap;
    }
    const inputId = `source-${index}`;
    const label = node("label", "source__label", "Source");
    label.htmlFor = inputId;
    label.append(hiddenText(` DICOMweb address for ${describe(study)}`));
    const row = node("div", "source__row");
    const input = node("input", "input source__input");
    input.id = inputId;
    input.type = "text";
    input.readOnly = true;
    input.value = study.sourceUrl;
    input.addEventListener("focus", () => input.select());
    const copy = node("button", "button button--secondary button--small", "Copy");
    copy.type = "button";
    copy.append(hiddenText(` DICOMweb address for ${describe(study)}`));
    copy.addEventListener("click", () => copySource(input, copy));
    row.append(input, copy);
    wrap.append(label, row);
    return wrap;
  }

  async function copySource(input, button) {
    let copied = false;
    try {
      await navigator.clipboard.writeText(input.value);
      copied = true;
    } catch (_) {
      input.select();
      copied = document.execCommand && document.execCommand("copy");
    }
    el.copyStatus.textContent = ""; // so that a second copy is announced again
    await Promise.resolve();
    el.copyStatus.textContent = copied
      ? "DICOMweb address copied to the clipboard"
      : "Could not copy: the address is selected, press Ctrl+C to copy it";
    button.firstChild.textContent = copied ? "Copied" : "Copy";
    setTimeout(() => {
      button.firstChild.textContent = "Copy";
    }, 2000);
  }

  function renderTimeline(added, focusFirst) {
    const start = search.studies.length - added.length;
    const items = added.map((s, i) => studyItem(s, start + i));
    el.timeline.append(...items);
    el.more.hidden = !search.next;
    if (focusFirst && items.length) items[0].focus();
  }

  // ------------------------------------------------------------------ states

  function setStatus(text) {
    el.status.className = "status";
    el.status.textContent = text;
  }

  function showError(title, detail) {
    el.status.className = "status status--error";
    el.status.replaceChildren(node("h2", "status__title", title), node("p", null, detail || ""));
  }

  function showApiError(error) {
    if (error.status === 401) {
      forgetToken();
      showSignedIn();
      showError(
        "You are not signed in",
        config.auth
          ? "Your session has ended or your sign-in was not accepted. Sign in again to search."
          : "The locator needs a sign-in token, but this page has no sign-in configured. Contact your administrator.",
      );
      return;
    }
    if (error.status === 403) {
      showError(
        "You are not authorised to search imaging records",
        "Your account does not have permission to read imaging studies. Ask your local administrator for access.",
      );
      return;
    }
    if (error.status === 0) {
      showError("The locator could not be reached", "Check your network connection and try again.");
      return;
    }
    if (error.status === 429) {
      showError("Too many searches", "Wait a minute, then try again.");
      return;
    }
    if (error.status >= 500) {
      const ref = error.requestId ? ` Reference: ${error.requestId}.` : "";
      showError("Sorry, there is a problem with the locator", `Try again later.${ref}`);
      return;
    }
    showError("The search could not be run", error.message || `The locator answered ${error.status}.`);
  }

  function resetResults() {
    el.results.hidden = true;
    el.timeline.replaceChildren();
    el.summary.replaceChildren();
    el.more.hidden = true;
  }

  // ------------------------------------------------------------------ searching

  async function runSearch(digits) {
    const seq = (searchSeq += 1);
    search = { nhs: digits, studies: [], endpoints: new Map(), next: null, total: null, seq };
    resetResults();
    el.results.setAttribute("aria-busy", "true");
    setStatus("Searching…");
    el.searchButton.disabled = true;
    try {
      const bundle = await firstPage(digits);
      if (seq !== searchSeq) return;
      const added = readBundle(bundle);
      await fillTrustNames(added);
      if (seq !== searchSeq) return;
      showResults(added);
    } catch (error) {
      if (seq === searchSeq) showApiError(error);
    } finally {
      el.searchButton.disabled = false;
      el.results.removeAttribute("aria-busy");
    }
  }

  /* The API gives a total only when the whole result fits in one page; otherwise say so. */
  function countText() {
    const shown = search.studies.length;
    const noun = shown === 1 ? "study" : "studies";
    if (search.total && search.total > shown) return `${shown} of ${search.total} studies shown`;
    if (search.next) return `${shown} most recent studies shown, older ones available`;
    return `${shown} ${noun} found`;
  }

  function showResults(added) {
    const nhs = formatNhs(search.nhs);
    if (!search.studies.length) {
      showError(
        `No imaging found for NHS Number ${nhs}`,
        "No trust has reported an imaging study for this NHS Number to the locator. Check the number, or ask the patient where they were imaged.",
      );
      el.status.className = "status status--empty";
      return;
    }
    setStatus(`${countText()} for NHS Number ${nhs}.`);
    el.status.classList.add("status--found");
    el.resultsHeading.textContent = `Imaging for NHS Number ${nhs}`;
    el.results.hidden = false;
    renderSummary();
    renderTimeline(added, false);
    el.resultsHeading.focus();
  }

  async function loadMore() {
    if (!search || !search.next) return;
    const seq = search.seq;
    el.moreButton.disabled = true;
    setStatus("Loading older studies…");
    try {
      const bundle = await fhir(search.next);
      if (seq !== searchSeq) return;
      const added = readBundle(bundle);
      await fillTrustNames(added);
      renderSummary();
      renderTimeline(added, true);
      setStatus(`${countText()}.`);
      el.status.classList.add("status--found");
    } catch (error) {
      if (seq === searchSeq) showApiError(error);
    } finally {
      el.moreButton.disabled = false;
    }
  }

  function onSubmit(event) {
    event.preventDefault();
    const result = checkNhsNumber(el.nhsInput.value);
    showNhsCheck(result, true);
    if (result.state !== "valid") {
      el.nhsInput.focus();
      return;
    }
    runSearch(result.digits);
  }

  // ------------------------------------------------------------------ start

  async function loadConfig() {
    try {
      const response = await fetch(CONFIG_URL, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (response.ok) config = await response.json();
    } catch (_) {
      config = { auth: false };
    }
  }

  async function start() {
    for (const [key, id] of Object.entries({
      form: "search-form", nhsGroup: "nhs-group", nhsInput: "nhs-number", nhsError: "nhs-error",
      nhsValid: "nhs-valid", searchButton: "search-button", status: "status", results: "results",
      resultsHeading: "results-heading", resultsCount: "results-count", summary: "summary", summaryLead: "summary-lead",
      summaryNote: "summary-note", timeline: "timeline", more: "more", moreButton: "more-button",
      copyStatus: "copy-status", signInPanel: "sign-in-panel", signIn: "sign-in",
      account: "account", signOut: "sign-out",
    })) {
      el[key] = $(id);
    }
    el.form.addEventListener("submit", onSubmit);
    el.nhsInput.addEventListener("input", () => showNhsCheck(checkNhsNumber(el.nhsInput.value), false));
    el.moreButton.addEventListener("click", loadMore);
    el.signIn.addEventListener("click", signIn);
    el.signOut.addEventListener("click", () => {
      forgetToken();
      resetResults();
      setStatus("You have signed out of this page.");
      showSignedIn();
    });

    const handedNhs = takeFragment();
    await loadConfig();
    try {
      await finishSignIn();
    } catch (error) {
      showError("Sign-in failed", error.message);
    }
    showSignedIn();
    document.body.classList.add("ready");
    searchHandedNumber(handedNhs);
    // A launching system may hand over a new token or patient to an already open page.
    window.addEventListener("hashchange", () => {
      const nhs = takeFragment();
      showSignedIn();
      searchHandedNumber(nhs);
    });
  }

  function searchHandedNumber(nhs) {
    if (nhs && !el.form.hidden) {
      el.nhsInput.value = nhs;
      el.form.requestSubmit();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
